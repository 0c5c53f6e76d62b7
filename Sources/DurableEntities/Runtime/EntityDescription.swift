/// What an entity is doing now, read from what is committed — Temporal's "describe workflow": the
/// status of its current run, and what that run waits for: activities (with the retry state that
/// history does not hold: the attempt, the last failure, when the next attempt starts, the last
/// heartbeat), durable timers and child entities.
///
/// ```swift
/// guard let transfer = try runtime.describe(EntityName(type: "transfer", id: "t-4")) else { return }
/// for activity in transfer.pendingActivities where activity.lastFailure != nil {
///     print(activity.name, activity.attempt ?? 0, activity.lastFailure!.message)
/// }
/// ```
///
/// Read by ``EntityRuntime/describe(_:)`` or ``EntityRef/describe()``. Every part is committed state,
/// read one after another (the activities' stored tasks first, then the run's events), so an
/// activity scheduled between the two reads is listed without its retry state (``PendingActivity/attempt``
/// `nil`); nothing acknowledged is missing. Times are nanoseconds on the runtime's clock.
public struct EntityDescription: Sendable, Hashable {
    /// How the current run stands.
    public enum Status: Sendable, Hashable {
        /// No run body has started in the current run: an entity of handlers only, or one whose run
        /// has not been started yet.
        case idle
        /// The run body started and has not ended.
        case running
        case completed
        /// The run failed with this message.
        case failed(message: String)
        /// The run's cancellation was requested and its body let the cancellation out.
        case cancelled(message: String)
        /// The entity was terminated, for this reason.
        case terminated(reason: String)

        /// Whether the run has ended (completed, failed, cancelled or terminated).
        public var isFinished: Bool {
            switch self {
            case .idle, .running: false
            case .completed, .failed, .cancelled, .terminated: true
            }
        }
    }

    /// An activity the run scheduled whose outcome is not recorded yet.
    public struct PendingActivity: Sendable, Hashable {
        /// Where the activity is, as far as this process knows.
        public enum State: Sendable, Hashable {
            /// Waiting to start: for a slot in the pool, for its activity type's registration, or for
            /// the runtime's next open (a runtime that is closed, or another process's journal).
            case scheduled
            /// An attempt runs now, in this process.
            case running
            /// Its last attempt failed and the retry policy retries it: the next attempt starts at
            /// ``PendingActivity/nextAttemptAt``.
            case backingOff
            /// An operator paused it (``EntityRuntime/pauseActivity(of:activity:)``): no attempt starts
            /// until a "retry now" (``EntityRuntime/retryActivityNow(of:activity:resettingAttempts:)``).
            /// One paused while its attempt ran shows as ``running`` with ``PendingActivity/pausedAfterAttempt``
            /// until that attempt ends.
            case paused
            /// The run asked it to stop and waits for how it ends
            /// (``ActivityCancellationType/waitCancellationCompleted``); no attempt starts any more.
            case cancelRequested
        }

        /// The failed attempt before the current one.
        public struct LastFailure: Sendable, Hashable {
            /// The error's type, as in ``ActivityFailure/causeType``.
            public var type: String
            /// The error's text, as in ``ActivityFailure/cause``.
            public var message: String
        }

        /// The activity's command id in the run.
        public var id: UInt64
        /// The activity's registered name.
        public var name: String
        public var options: ActivityOptions
        /// When its `activityScheduled` event was recorded.
        public var scheduledAt: UInt64
        public var state: State
        /// The attempt running, or else the next one (1 before the first); `nil` when its task is not
        /// stored: scheduled between the two reads of the description, or lost from disk (its
        /// entity stores it again at its next load).
        public var attempt: Int?
        /// When the next attempt may start: set while ``State/backingOff``.
        public var nextAttemptAt: UInt64?
        /// The last failed attempt's error; `nil` before any attempt failed.
        public var lastFailure: LastFailure?
        /// The last heartbeat details stored (what the next attempt reads in
        /// ``ActivityContext/heartbeatDetails``).
        public var heartbeatDetails: [UInt8]?
        /// When its schedule-to-close timeout ends it, if it has one. It does while paused too.
        public var scheduleToCloseDeadline: UInt64?
        /// An operator paused it while its attempt ran: that attempt goes on, and if it fails, no
        /// further attempt starts until a "retry now".
        public var pausedAfterAttempt = false
    }

    /// A durable timer the run started that has neither fired nor been cancelled: a `sleep`, or the
    /// deadline of a `condition(timeout:)`.
    public struct PendingTimer: Sendable, Hashable {
        /// The timer's command id in the run.
        public var id: UInt64
        /// When its `timerStarted` event was recorded, and when it falls due.
        public var startedAt: UInt64
        public var dueAt: UInt64
    }

    public var name: EntityName
    /// The current run's number (continue-as-new starts the next one).
    public var run: UInt64
    public var status: Status
    /// When the run body started (its `started` event); `nil` while ``Status/idle``.
    public var startedAt: UInt64?
    /// When the run ended (its last event); `nil` until it has.
    public var closedAt: UInt64?
    /// How many events the current run has recorded.
    public var historyLength: Int
    /// When the current run's latest event was recorded; `nil` for a run with no event yet.
    public var lastEventAt: UInt64?
    /// The activities the run waits for, in the order it scheduled them.
    public var pendingActivities: [PendingActivity]
    /// Its timers that have not fired, in the order it started them.
    public var pendingTimers: [PendingTimer]
    /// The child entities it started whose outcome is not recorded yet, in the order it started them.
    public var pendingChildren: [ExportedHistory.Child]
}

extension EntityDescription {
    /// The description of `history`'s run, with the activities' stored tasks and what this process's
    /// worker is doing with them.
    /// - Parameters:
    ///   - tasks: the entity's stored activity tasks, by activity id.
    ///   - cancelRequested: the activities whose cancellation request row is stored.
    ///   - paused: the activities whose pause row is stored (see ``ActivityTask/pauseKey(entity:activity:)``).
    ///   - live: what the worker is doing now with each pending activity.
    ///   - now: the runtime's clock.
    init(history: ExportedHistory, tasks: [UInt64: ActivityTask], cancelRequested: Set<UInt64>, paused: Set<UInt64>,
         live: (_ ids: [UInt64]) -> [UInt64: ActivityWorker.Progress], now: UInt64) throws(EntityError) {
        let events = try history.decodedEvents()
        var status = Status.idle
        var startedAt: UInt64?
        var timers: [PendingTimer] = []
        for (_, event) in events {
            switch event.kind {
            case .started:
                status = .running
                startedAt = event.timeNanoseconds
            case .timerStarted:
                if case .startTimer(let id, let due)? = event.command {
                    timers.append(PendingTimer(id: id, startedAt: event.timeNanoseconds, dueAt: due))
                }
            case .timerCancelled:
                if case .cancelTimer(let id, _)? = event.command { timers.removeAll { $0.id == id } }
            case .timerFired:
                if let id = event.firedTimer { timers.removeAll { $0.id == id } }
            default:
                break
            }
        }
        var closedAt: UInt64?
        if let last = events.last?.event {
            let text = String(decoding: last.body, as: UTF8.self)
            switch last.kind {
            case .completed: status = .completed
            case .failed: status = .failed(message: text)
            case .cancelled: status = .cancelled(message: text)
            case .terminated: status = .terminated(reason: text)
            default: break
            }
            if status.isFinished { closedAt = last.timeNanoseconds }
        }

        var activities: [PendingActivity] = []
        // A finished run waits for nothing: its activities, timers and children were given up with it.
        if !status.isFinished {
            let awaited = try history.activities().filter { $0.outcome == nil }
            let progress = live(awaited.map(\.id))
            for activity in awaited {
                let task = tasks[activity.id]
                var pending = PendingActivity(
                    id: activity.id, name: activity.name, options: activity.options, scheduledAt: activity.scheduledAt,
                    state: .scheduled, attempt: task?.attempt, nextAttemptAt: nil,
                    lastFailure: task.flatMap { task in
                        task.lastError.map { PendingActivity.LastFailure(type: task.lastErrorType ?? "", message: $0) }
                    },
                    heartbeatDetails: task?.heartbeat,
                    scheduleToCloseDeadline: activity.options.scheduleToCloseTimeout.map {
                        (task?.scheduledAt ?? activity.scheduledAt).saturatingAdd($0.nanoseconds)
                    })
                if activity.cancelRequested || cancelRequested.contains(activity.id) {
                    pending.state = .cancelRequested
                } else {
                    switch progress[activity.id] {
                    case .running(let attempt)?:
                        pending.state = .running
                        pending.pausedAfterAttempt = paused.contains(activity.id)
                        if let attempt { pending.attempt = attempt }
                    case .queued(let attempt)?:
                        pending.attempt = attempt
                        if paused.contains(activity.id) { pending.state = .paused }  // it does not start
                    case nil:
                        if let task, task.isPaused || paused.contains(activity.id) {
                            pending.state = .paused
                        } else if let task, task.notBefore > now, task.attempt > 1 {
                            pending.state = .backingOff
                            pending.nextAttemptAt = task.notBefore
                        }
                    }
                }
                activities.append(pending)
            }
        }
        self.init(name: EntityName(type: history.entityType, id: history.entityID), run: history.run, status: status,
                  startedAt: startedAt, closedAt: closedAt, historyLength: events.count, lastEventAt: events.last?.event.timeNanoseconds,
                  pendingActivities: activities, pendingTimers: status.isFinished ? [] : timers,
                  pendingChildren: status.isFinished ? [] : try history.children().filter { $0.outcome == nil })
    }
}

extension EntityDescription: CustomStringConvertible {
    /// For people (logs, a support tool): a first line with the run, its status and its history, then
    /// one line for each thing the run waits for. Times are nanoseconds on the runtime's clock.
    ///
    ///     Transfer/t-7, run 1: running, started at 1767225600000000000, 3 events, the last at 1767225601000000000
    ///       activity 4294967298 bank.deposit: backingOff, attempt 3, next at 1767225604000000000, last failure BankError: unavailable
    ///       timer 4294967299 due at 1767240000000000000
    ///       child Payment/p-7 (command 4294967300)
    public var description: String {
        var first = "\(name), run \(run): \(status)" + (startedAt.map { ", started at \($0)" } ?? "")
            + (closedAt.map { ", ended at \($0)" } ?? "") + ", \(historyLength) event\(historyLength == 1 ? "" : "s")"
        if closedAt == nil, let last = lastEventAt { first += ", the last at \(last)" }
        var lines = [first]
        for activity in pendingActivities {
            var line = "  activity \(activity.id) \(activity.name): \(activity.state)"
            if let attempt = activity.attempt { line += ", attempt \(attempt)" }
            if activity.pausedAfterAttempt { line += ", paused after it" }
            if let next = activity.nextAttemptAt { line += ", next at \(next)" }
            if let failure = activity.lastFailure { line += ", last failure \(failure.type): \(failure.message)" }
            lines.append(line)
        }
        for timer in pendingTimers { lines.append("  timer \(timer.id) due at \(timer.dueAt)") }
        for child in pendingChildren { lines.append("  child \(child.name) (command \(child.id))") }
        return lines.joined(separator: "\n")
    }
}

extension EntityDescription.Status: CustomStringConvertible {
    public var description: String {
        switch self {
        case .idle: "idle"
        case .running: "running"
        case .completed: "completed"
        case .failed(let message): "failed (\(message))"
        case .cancelled(let message): "cancelled (\(message))"
        case .terminated(let reason): "terminated (\(reason))"
        }
    }
}
