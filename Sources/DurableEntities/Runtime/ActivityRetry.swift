/// What ``EntityRuntime/retryActivityNow(of:activity:resettingAttempts:)`` did.
public enum ActivityRetry: Sendable, Hashable {
    /// The activity was backing off or paused: its next attempt, with this number, was made due now
    /// and queued in the pool.
    case retrying(attempt: Int)
    /// No attempt to bring forward: an attempt with this number runs now (or is marked as running in
    /// its stored task), or is queued, or is due already and waits for a slot in the pool or for its
    /// activity type's registration. A pause made while it ran was withdrawn: if it fails, it is
    /// retried by its policy.
    case alreadyDue(attempt: Int)
}

/// What ``EntityRuntime/pauseActivity(of:activity:)`` did.
public enum ActivityPause: Sendable, Hashable {
    /// No attempt runs, and none starts until a "retry now"; the next one will be this one. Also when
    /// it already was paused.
    case paused(attempt: Int)
    /// An attempt with this number runs: it goes on (it may still succeed, or fail for good), and if
    /// it fails with a retry to come, the activity is paused before that retry. If it gives a
    /// heartbeat meanwhile, it is interrupted there (see ``EntityRuntime/pauseActivity(of:activity:)``).
    case pausedAfterAttempt(attempt: Int)
}

extension EntityRuntime {
    /// Runs an activity's next attempt now instead of at the end of its backoff — an operator's
    /// "retry now" once whatever made its attempts fail (a gateway down, a bad credential) is fixed.
    /// It also resumes an activity paused by ``pauseActivity(of:activity:)``, and withdraws a pause
    /// made while an attempt ran.
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
        switch try await reschedule(name, id, .now(resettingAttempts: resettingAttempts)) {
        case .retrying(let attempt): return .retrying(attempt: attempt)
        case .running(let attempt), .due(let attempt), .paused(let attempt), .pausedAfter(let attempt): return .alreadyDue(attempt: attempt)
        case let refusal: throw refused(refusal, name, id)
        }
    }

    /// Pauses an activity: no further attempt starts — not at the end of its backoff, not after a
    /// restart — until ``retryActivityNow(of:activity:resettingAttempts:)`` resumes it (Temporal's
    /// activity pause). What an operator does while whatever makes its attempts fail is being fixed,
    /// so that the retries stop hammering it and stop using up `maximumAttempts`. ``describe(_:)``
    /// shows it as ``EntityDescription/PendingActivity/State/paused``.
    ///
    /// An activity backing off, queued or due is paused at once: its retry timer goes. One whose
    /// attempt runs is paused after that attempt: the attempt goes on (it cannot be taken back, and it
    /// may succeed), and if it fails with a retry to come, that retry waits for a "retry now"
    /// (``EntityDescription/PendingActivity/pausedAfterAttempt`` meanwhile).
    ///
    /// An attempt that gives heartbeats is interrupted at its next one, as Temporal interrupts a
    /// heartbeating activity: its task is cancelled (``ActivityContext/isCancelled``, and
    /// cancellation-aware waits throw), and ``ActivityContext/isPaused`` tells it why, so it can clean
    /// up and stop. If it then fails, the failure does not count against `maximumAttempts`: the
    /// activity is paused at that same attempt number, with the heartbeat details it gave, so a pause
    /// never uses up the budget nor fails the activity. Output it returns anyway is its outcome.
    ///
    /// The run still waits for the activity (a timer or a cancellation in the run body can end that
    /// wait), and its schedule-to-close timeout still ends it on time: a paused activity fails with
    /// reason `scheduleToCloseTimeout` at its deadline. Durable: the pause is stored before the call
    /// returns, and holds across a crash (an attempt cut off by it counts as failed, and the next one
    /// is paused). Each change of the stored task is a compare-and-set, as for a retry.
    /// - Returns: ``ActivityPause/paused(attempt:)`` (also when it already was), or
    ///   ``ActivityPause/pausedAfterAttempt(attempt:)`` when an attempt runs. No attempt starts once a
    ///   pause answered: one that had started before is the running one. One answer is not exact: a
    ///   pause that comes just after an attempt ended, while its outcome is being recorded, answers
    ///   `paused`; that outcome then ends the activity (its pause row goes with it).
    /// - Throws: ``EntityError`` `rejected` when the entity's run awaits no such activity or the run
    ///   requested its cancellation; `closed`; `storage`.
    public func pauseActivity(of name: EntityName, activity id: UInt64) async throws(EntityError) -> ActivityPause {
        switch try await reschedule(name, id, .pause) {
        case .paused(let attempt): return .paused(attempt: attempt)
        case .pausedAfter(let attempt), .running(let attempt): return .pausedAfterAttempt(attempt: attempt)
        case .retrying(let attempt), .due(let attempt): return .paused(attempt: attempt)  // not answered to a pause
        case let refusal: throw refused(refusal, name, id)
        }
    }

    /// What the worker did with an operator's change of an activity's schedule.
    private func reschedule(_ name: EntityName, _ id: UInt64, _ change: ActivityWorker.Reschedule)
        async throws(EntityError) -> ActivityWorker.Rescheduled {
        guard !core.closed.load(ordering: .acquiring) else { throw EntityError(.closed, entity: name, "the runtime is closed") }
        do {
            guard let key = try core.journal.key(for: name) else {
                throw EntityError(.rejected, entity: name, "the entity has no history, so no activity \(id)")
            }
            return try await core.activities.reschedule(entity: key.rawValue, activity: id, change)
        } catch let error as EntityError {
            throw error
        } catch let error as JournalError {
            throw EntityError(error.code == .closed ? .closed : .storage, entity: name, "rescheduling activity \(id) failed", underlying: error)
        } catch {
            throw EntityError(.storage, entity: name, "rescheduling activity \(id) failed", underlying: error)
        }
    }

    /// The error for a worker's answer that refuses the change (the activity is not pending, or its
    /// cancellation was requested).
    private func refused(_ answer: ActivityWorker.Rescheduled, _ name: EntityName, _ id: UInt64) -> EntityError {
        if case .cancelRequested = answer {
            return EntityError(.rejected, entity: name, "activity \(id)'s cancellation was requested: no further attempt starts")
        }
        return EntityError(.rejected, entity: name, "the entity awaits no activity \(id): its outcome is recorded, its run gave it up, or the id is wrong")
    }
}

extension EntityRef {
    /// Runs the activity `id`'s next attempt now instead of at the end of its backoff (or resumes it
    /// when paused): see ``EntityRuntime/retryActivityNow(of:activity:resettingAttempts:)``.
    public func retryActivityNow(_ id: UInt64, resettingAttempts: Bool = false) async throws(EntityError) -> ActivityRetry {
        try await runtime.retryActivityNow(of: name, activity: id, resettingAttempts: resettingAttempts)
    }

    /// Pauses the activity `id` (backing off, queued or due at once; running, after its attempt)
    /// until a "retry now": see ``EntityRuntime/pauseActivity(of:activity:)``.
    public func pauseActivity(_ id: UInt64) async throws(EntityError) -> ActivityPause {
        try await runtime.pauseActivity(of: name, activity: id)
    }
}
