import Metrics

/// The metrics of one registered activity (swift-metrics), with the dimension `activity` (its
/// registered name). Made once, when the activity is registered, so that an attempt records into
/// objects it already holds, with no lookup; like the runtime's other metrics they are no-ops unless
/// the application bootstrapped a backend before the registration (activities passed to the
/// runtime's initializer register as it is made). Durations are on the runtime's
/// clock (a ``TestClock`` in tests), like everything else the runtime times.
///
/// - `durable_entities_activity_attempts` (counter; dimension `result`): every attempt's end —
///   `completed`, `retried` (it failed and the policy runs another), `failed` (the activity failed
///   for good: non-retryable, retries exhausted, a schedule-to-close timeout), `dropped` (the runtime
///   closed meanwhile; the task runs again at the next open).
/// - `durable_entities_activity_attempt_duration` (timer): from an attempt's start to its end.
/// - `durable_entities_activity_schedule_to_start` (timer): how long a pool attempt waited to
///   start once it was due (its activity scheduled, or its retry's time come): the pool's backlog.
///   Local attempts, which start inside their turn, do not record it.
/// - `durable_entities_activity_timeouts` (counter; dimension `timeout`: `start_to_close`,
///   `schedule_to_close`, `heartbeat`): attempts a watchdog ended (retried or not).
final class ActivityMetrics: Sendable {
    private let completed: Counter
    private let retried: Counter
    private let failed: Counter
    private let dropped: Counter
    private let startToCloseTimeouts: Counter
    private let scheduleToCloseTimeouts: Counter
    private let heartbeatTimeouts: Counter
    private let attemptDuration: Metrics.Timer
    private let scheduleToStart: Metrics.Timer

    /// - Parameter dimensions: the runtime's own (``EntityRuntime/Configuration/metricsDimensions``),
    ///   added after `activity`.
    init(activity: String, dimensions: [(String, String)] = []) {
        let named = [("activity", activity)] + dimensions
        func attempts(_ result: String) -> Counter {
            Counter(label: "durable_entities_activity_attempts", dimensions: named + [("result", result)])
        }
        func timeouts(_ timeout: String) -> Counter {
            Counter(label: "durable_entities_activity_timeouts", dimensions: named + [("timeout", timeout)])
        }
        completed = attempts("completed")
        retried = attempts("retried")
        failed = attempts("failed")
        dropped = attempts("dropped")
        startToCloseTimeouts = timeouts("start_to_close")
        scheduleToCloseTimeouts = timeouts("schedule_to_close")
        heartbeatTimeouts = timeouts("heartbeat")
        attemptDuration = Metrics.Timer(label: "durable_entities_activity_attempt_duration", dimensions: named)
        scheduleToStart = Metrics.Timer(label: "durable_entities_activity_schedule_to_start", dimensions: named)
    }

    /// An attempt ended with `decision` (a watchdog's `timedOut` if one ended it), having started at
    /// `startedAt` and ended at `endedAt` (ns, runtime clock); `due`: when a pool attempt could have
    /// started (its schedule-to-start is recorded), `nil` for a local one.
    func attemptEnded(_ decision: ActivityWorker.Decision, timedOut: ActivityWorker.Timeout?, due: UInt64?,
                      startedAt: UInt64, endedAt: UInt64) {
        if let due { scheduleToStart.recordNanoseconds(Int64(clamping: startedAt &- min(due, startedAt))) }
        switch decision {
        case .succeeded: completed.increment()
        case .retry: retried.increment()
        case .failed: failed.increment()
        case .dropped: dropped.increment()
        }
        switch timedOut {
        case .startToClose?: startToCloseTimeouts.increment()
        case .scheduleToClose?: scheduleToCloseTimeouts.increment()
        case .heartbeat?: heartbeatTimeouts.increment()
        case nil: break
        }
        attemptDuration.recordNanoseconds(Int64(clamping: endedAt &- min(startedAt, endedAt)))
    }
}
