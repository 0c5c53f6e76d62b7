/// What ``EntityRuntime/retryActivityNow(of:activity:resettingAttempts:)`` did.
public enum ActivityRetry: Sendable, Hashable {
    /// The activity was backing off: its next attempt, with this number, was made due now and
    /// queued in the pool.
    case retrying(attempt: Int)
    /// Nothing to change: an attempt with this number runs now (or is marked as running in its stored
    /// task), or is queued, or is due already and waits for a slot in the pool or for its activity
    /// type's registration.
    case alreadyDue(attempt: Int)
}

extension EntityRuntime {
    /// Runs an activity's next attempt now instead of at the end of its backoff — an operator's
    /// "retry now" once whatever made its attempts fail (a gateway down, a bad credential) is fixed.
    /// Find the activity with ``describe(_:)``: its ``EntityDescription/PendingActivity/id``, in state
    /// ``EntityDescription/PendingActivity/State/backingOff``.
    ///
    /// ```swift
    /// for activity in try runtime.describe(name)?.pendingActivities ?? [] where activity.state == .backingOff {
    ///     _ = try await runtime.retryActivityNow(of: name, activity: activity.id)
    /// }
    /// ```
    ///
    /// The attempt keeps the activity's idempotency key, input, last heartbeat details and
    /// schedule-to-close deadline. With `resettingAttempts`, it is attempt 1 again (Temporal's
    /// activity reset): the retry policy's `maximumAttempts` and its backoff intervals count afresh.
    /// Nothing is recorded in the run's history: retries never are.
    ///
    /// Durable and safe against what runs meanwhile: it commits only if the activity's stored task
    /// is still the one it read (a compare-and-set in the journal), so it never overwrites a newer
    /// attempt's state and never starts an attempt twice; if the task moved on in between, it reads
    /// again and decides again. Once it returns, a crash does not undo it: the next open runs the
    /// attempt at once.
    /// - Parameters:
    ///   - name: the entity whose run awaits the activity.
    ///   - id: the activity's ``EntityDescription/PendingActivity/id``.
    ///   - resettingAttempts: start the count of attempts again at 1.
    /// - Returns: ``ActivityRetry/retrying(attempt:)``, or ``ActivityRetry/alreadyDue(attempt:)`` when
    ///   an attempt runs or is due already (nothing changed).
    /// - Throws: ``EntityError`` `rejected` when the entity's run awaits no such activity (it ended,
    ///   or the id is wrong) or the run requested its cancellation; `closed`; `storage`.
    public func retryActivityNow(of name: EntityName, activity id: UInt64, resettingAttempts: Bool = false)
        async throws(EntityError) -> ActivityRetry {
        guard !core.closed.load(ordering: .acquiring) else { throw EntityError(.closed, entity: name, "the runtime is closed") }
        let outcome: ActivityWorker.RetryNow
        do {
            guard let key = try core.journal.key(for: name) else {
                throw EntityError(.rejected, entity: name, "the entity has no history, so no activity \(id) to retry")
            }
            outcome = try await core.activities.retryNow(entity: key.rawValue, activity: id, resettingAttempts: resettingAttempts)
        } catch let error as EntityError {
            throw error
        } catch let error as JournalError {
            throw EntityError(error.code == .closed ? .closed : .storage, entity: name, "retrying activity \(id) failed", underlying: error)
        } catch {
            throw EntityError(.storage, entity: name, "retrying activity \(id) failed", underlying: error)
        }
        switch outcome {
        case .retrying(let attempt): return .retrying(attempt: attempt)
        case .running(let attempt), .due(let attempt): return .alreadyDue(attempt: attempt)
        case .notPending:
            throw EntityError(.rejected, entity: name, "the entity awaits no activity \(id): its outcome is recorded, its run gave it up, or the id is wrong")
        case .cancelRequested:
            throw EntityError(.rejected, entity: name, "activity \(id)'s cancellation was requested: no further attempt starts")
        }
    }
}

extension EntityRef {
    /// Runs the activity `id`'s next attempt now instead of at the end of its backoff: see
    /// ``EntityRuntime/retryActivityNow(of:activity:resettingAttempts:)``.
    public func retryActivityNow(_ id: UInt64, resettingAttempts: Bool = false) async throws(EntityError) -> ActivityRetry {
        try await runtime.retryActivityNow(of: name, activity: id, resettingAttempts: resettingAttempts)
    }
}
