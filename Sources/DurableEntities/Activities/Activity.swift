import Logging
import Synchronization

/// A unit of work with side effects — a payment, an e-mail, a database write — called from a run body
/// with ``WorkflowContext/execute(_:_:options:)``.
///
/// Activities run on the runtime's bounded activity pool, outside the shards. They may run more than
/// once (a retry, a crash before the outcome was recorded), so they must be idempotent: use
/// ``ActivityContext/idempotencyKey``, which is the same on every attempt and across restarts.
///
/// The pool runs an attempt on one of a few threads (one per processor) until the attempt returns or
/// awaits something outside (a network answer, a timer, an actor); from then on it waits without
/// holding a thread, and counts against ``EntityRuntime/Configuration/maxConcurrentActivities`` until
/// it returns. Await I/O rather than block on it: a blocking call holds one of those threads.
///
/// An attempt counts against the retry policy's `maximumAttempts` when it fails, times out, or is
/// cut off by a crash after its start was stored: either it stored a heartbeat
/// (``ActivityContext/heartbeat(_:)``), or its type sets ``recordsAttemptStart``. An attempt cut off
/// before either runs again under the same number. So an activity that might bring the process down
/// (a huge input, a library that traps, memory exhaustion) should set ``recordsAttemptStart``: then
/// the retry policy ends a crash loop however early in the attempt the crash comes.
///
/// ## Usage
/// ```swift
/// struct Charge: Activity {
///     let gateway: PaymentGateway
///     func run(_ input: ChargeRequest, context: ActivityContext) async throws -> Receipt {
///         try await gateway.charge(input, idempotencyKey: context.idempotencyKey)
///     }
/// }
/// runtime.register(activity: Charge(gateway: gateway))
/// ```
public protocol Activity: Sendable {
    associatedtype Input: Codable & Sendable
    associatedtype Output: Codable & Sendable
    /// The name under which it is registered and recorded in histories.
    static var name: String { get }
    /// Whether each attempt's start is stored before the attempt runs (default `false`).
    ///
    /// When `true`, an attempt runs only once the journal has durably marked its task as running that
    /// attempt, so an attempt cut off by a crash at any point (even before its first heartbeat) counts
    /// as a failed attempt at the next open: the next attempt has the next number, and
    /// `maximumAttempts` ends an activity that keeps crashing the process. This is what a Temporal
    /// user gets for every activity, and it costs the same here: one more commit before each attempt
    /// (a commit round-trip of latency, typically a millisecond or two, and a few microseconds of CPU).
    /// Leave it `false` for activities that cannot bring the process down.
    ///
    /// An attempt whose start cannot be stored (a storage error) does not run and is not counted: it
    /// is tried again after the retry policy's delay. With ``WorkflowContext/executeLocal(_:_:options:)``
    /// such an activity runs on the pool, like ``WorkflowContext/execute(_:_:options:)``: its task is
    /// stored by the scheduling turn's commit, and its start after that.
    static var recordsAttemptStart: Bool { get }
    func run(_ input: Input, context: ActivityContext) async throws -> Output
}

extension Activity {
    /// The type's name, as `String(describing:)` writes it.
    public static var name: String { DefaultActivityNames.name(of: Self.self) }
    /// `false`: an attempt's start is stored with its first heartbeat, if any.
    public static var recordsAttemptStart: Bool { false }
}

/// The default activity names, made once per type: `String(describing:)` of a metatype goes through
/// the runtime's printing machinery (~2% of all CPU in `saga-transfer` when done per call).
enum DefaultActivityNames {
    private static let names = Mutex<[ObjectIdentifier: String]>([:])

    static func name(of type: any Any.Type) -> String {
        let id = ObjectIdentifier(type)
        if let name = names.withLock({ $0[id] }) { return name }
        let name = String(describing: type)
        names.withLock { $0[id] = name }
        return name
    }
}

/// What an attempt of an activity knows and can do.
public final class ActivityContext: Sendable {
    /// The same for every attempt of this activity, across retries and restarts: hand it to the
    /// system the activity calls so that a repeated call has one effect.
    public let idempotencyKey: String
    /// 1 for the first attempt.
    public let attempt: Int
    /// The entity whose run body scheduled the activity.
    public let entity: EntityName
    public let logger: Logger
    private let heartbeats: Mutex<Heartbeats>
    /// Told of each heartbeat (to rearm the heartbeat watchdog), when there is one.
    private let onHeartbeat: (@Sendable () -> Void)?
    private let codec: any EntityCodec

    private struct Heartbeats {
        /// Where heartbeats are stored: the worker and the attempt's task. A pool attempt has it
        /// from its start; a local one once it left its turn and its task is stored.
        var store: (worker: ActivityWorker, task: ActivityTask)?
        /// The last heartbeat's details (this attempt's, else the previous one's).
        var details: [UInt8]?
        /// This attempt gave a heartbeat.
        var beat = false
        /// When this attempt last stored its details (ns on the runtime's clock).
        var storedAt: UInt64?
        /// The attempt's start was stored before it ran (``Activity/recordsAttemptStart``).
        var startStored = false
        /// The attempt ended: a late heartbeat (from work it left behind) stores nothing.
        var ended = false
    }

    init(idempotencyKey: String, attempt: Int, entity: EntityName, logger: Logger, lastHeartbeat: [UInt8]?, codec: any EntityCodec,
         store: (worker: ActivityWorker, task: ActivityTask)? = nil, startStored: Bool = false, onHeartbeat: (@Sendable () -> Void)?) {
        self.idempotencyKey = idempotencyKey
        self.attempt = attempt
        self.entity = entity
        self.logger = logger
        self.heartbeats = Mutex(Heartbeats(store: store, details: lastHeartbeat, startStored: startStored))
        self.codec = codec
        self.onHeartbeat = onHeartbeat
    }

    /// Reports progress: resets the heartbeat timeout, and `details` are what the next attempt reads
    /// (``lastHeartbeat(as:)``) if this one fails, times out or is cut off by a crash.
    ///
    /// A pool attempt's details are stored with its task: the first heartbeat's at once, later ones
    /// at most once per ``EntityRuntime/Configuration/activityHeartbeatStoreInterval`` (a crash loses
    /// at most that much progress; the last details are stored anyway when the attempt fails or a
    /// close cancels it). A stored heartbeat also marks the attempt as started: an attempt cut off by
    /// a crash after one counts as a failed attempt (the next one has the next number, and
    /// `maximumAttempts` ends an activity that keeps crashing the process; to have that from the
    /// attempt's first instruction, see ``Activity/recordsAttemptStart``).
    ///
    /// A local activity's attempt (``WorkflowContext/executeLocal(_:_:options:)``) keeps its details
    /// in memory while it runs inside the turn that started it: nothing of it is stored yet, and an
    /// outcome inside the turn is recorded with the turn. Once it has left its turn and the turn's
    /// commit stored its task, its heartbeats are stored as a pool attempt's are (the last one given
    /// before, if any, at once).
    public func heartbeat<Details: Codable & Sendable>(_ details: Details) {
        guard let bytes = try? codec.encode(details) else { return }
        let stored = heartbeats.withLock { state -> (worker: ActivityWorker, task: ActivityTask)? in
            state.details = bytes
            state.beat = true
            guard let store = state.store, !state.ended else { return nil }
            let now = store.worker.now
            if let last = state.storedAt, now < last.saturatingAdd(store.worker.heartbeatStoreInterval) { return store }
            state.storedAt = now
            // Submitted under the lock: never after ``end()``, so never behind the row the attempt's
            // end stores (a retry's), which it would overwrite.
            store.worker.storeHeartbeat(bytes, of: store.task)
            return store
        }
        onHeartbeat?()
        // Outside the lock: an operator's pause interrupts the attempt here (see ``isPaused``).
        if let stored { stored.worker.heartbeatGiven(by: stored.task.id) }
    }

    /// A local attempt that left its turn: the turn's commit stored its task (`task`, with its
    /// entity's key). Its heartbeats are stored from now on; one it gave before is stored at once.
    func taskStored(_ task: ActivityTask, by worker: ActivityWorker) {
        heartbeats.withLock { state in
            guard state.store == nil, !state.ended else { return }
            state.store = (worker, task)
            guard state.beat, let bytes = state.details else { return }
            state.storedAt = worker.now
            worker.storeHeartbeat(bytes, of: task)
        }
    }

    /// Ends the attempt's heartbeats: returns the last details and whether this attempt's task is
    /// marked as running it (a heartbeat or its start was stored); a later heartbeat stores nothing.
    func end() -> (details: [UInt8]?, marked: Bool) {
        heartbeats.withLock { state in
            state.ended = true
            return (state.details, state.storedAt != nil || state.startStored)
        }
    }

    /// The details of the last heartbeat — of this attempt, or else of the attempt before it.
    public func lastHeartbeat<Details: Codable & Sendable>(as type: Details.Type) -> Details? {
        guard let bytes = heartbeats.withLock({ $0.details }) else { return nil }
        return try? bytes.withUnsafeBytes { try codec.decode(Details.self, from: $0) }
    }

    /// Whether the attempt was cancelled: a timeout, the runtime closing, or its run no longer awaiting
    /// it (the run was cancelled, the entity terminated, or the run continued as new; a pool attempt
    /// learns it once that is committed). Cancellation-aware waits (`Task.sleep`, URLSession, …)
    /// throw `CancellationError` then. A cancelled attempt that fails is not retried; one that
    /// returns anyway is not an error, but its outcome is dropped when its run no longer awaits it.
    public var isCancelled: Bool { Task.isCancelled }

    /// Whether an operator paused the activity (``EntityRuntime/pauseActivity(of:activity:)``) while
    /// this attempt runs, and has not resumed it. An attempt is not stopped by a pause until it gives
    /// a heartbeat: that heartbeat cancels it (``isCancelled``), and this says why — Temporal's
    /// pause of a heartbeating activity. An attempt that then fails is not counted: the activity
    /// waits, paused, at this attempt's number, and the next attempt reads the last heartbeat's
    /// details. Always `false` for a local attempt inside its turn (its task is not stored yet).
    public var isPaused: Bool {
        guard let store = heartbeats.withLock({ $0.store }) else { return false }
        return store.worker.isPauseHeld(store.task.id)
    }
}

/// How an activity is retried. Delays grow from `initialInterval` by `backoffCoefficient` up to
/// `maximumInterval`; the default retries without limit (bounded by `scheduleToCloseTimeout`).
public struct RetryPolicy: Codable, Sendable, Hashable {
    public var initialInterval: Duration
    public var backoffCoefficient: Double
    /// The longest delay between attempts (default: 100 × `initialInterval`).
    public var maximumInterval: Duration?
    /// The most attempts in all, first included; 0 means no limit.
    public var maximumAttempts: Int
    /// Error type names (`String(describing: type(of: error))`) that end the retries at once.
    public var nonRetryableErrorTypes: [String]

    public init(initialInterval: Duration = .seconds(1), backoffCoefficient: Double = 2, maximumInterval: Duration? = nil,
                maximumAttempts: Int = 0, nonRetryableErrorTypes: [String] = []) {
        self.initialInterval = initialInterval
        self.backoffCoefficient = backoffCoefficient
        self.maximumInterval = maximumInterval
        self.maximumAttempts = maximumAttempts
        self.nonRetryableErrorTypes = nonRetryableErrorTypes
    }

    /// 1 s, ×2, at most 100 s between attempts, no limit on attempts.
    public static let `default` = RetryPolicy()
    /// One attempt only.
    public static let never = RetryPolicy(maximumAttempts: 1)

    /// Exponential backoff with at most `max` attempts.
    public static func exponential(max attempts: Int, initial: Duration = .seconds(1), coefficient: Double = 2) -> RetryPolicy {
        RetryPolicy(initialInterval: initial, backoffCoefficient: coefficient, maximumAttempts: attempts)
    }

    /// The delay before attempt `attempt + 1`, after attempt `attempt` failed (computed in floating
    /// point and capped, so a long interval or a large coefficient never overflows).
    public func delay(after attempt: Int) -> Duration {
        let initial = Double(initialInterval.nanoseconds)
        let grown = initial * pow(backoffCoefficient, Double(max(0, attempt - 1)))
        let cap = maximumInterval.map { Double($0.nanoseconds) } ?? initial * 100
        let nanoseconds = min(grown, cap, 9.2e18)  // within Int64
        guard nanoseconds.isFinite, nanoseconds > 0 else { return .zero }
        return .nanoseconds(Int64(nanoseconds))
    }

    /// Why the policy is invalid, or `nil`: the initial interval must be positive, the coefficient at
    /// least 1 (and finite), the maximum interval (if set) at least the initial one, and the maximum
    /// attempts not negative.
    var invalidity: String? {
        if initialInterval <= .zero { return "the retry policy's initial interval must be positive (got \(initialInterval))" }
        if !backoffCoefficient.isFinite || backoffCoefficient < 1 {
            return "the retry policy's backoff coefficient must be a finite number of at least 1 (got \(backoffCoefficient))"
        }
        if let maximumInterval, maximumInterval < initialInterval {
            return "the retry policy's maximum interval (\(maximumInterval)) must be at least its initial interval (\(initialInterval))"
        }
        if maximumAttempts < 0 { return "the retry policy's maximum attempts must be 0 (no limit) or more (got \(maximumAttempts))" }
        return nil
    }
}

/// What cancelling the wait for an activity does (the task awaiting it is cancelled, or the run is):
/// Temporal's activity cancellation types.
public enum ActivityCancellationType: UInt8, Codable, Sendable, Hashable {
    /// The wait throws at once (``ActivityFailure`` with reason `cancelled`, 0 attempts); the
    /// activity's task is deleted in the same commit, so no further attempt starts, and an attempt
    /// still running is cancelled once that is durable (its outcome, if it returns one, is dropped).
    /// The default.
    case tryCancel = 0
    /// The cancellation is recorded (`activityCancelRequested`) and the activity is asked to stop,
    /// but the wait goes on until the activity has really ended, and returns how it ended:
    /// - an attempt that is running is cancelled (``ActivityContext/isCancelled``, cancellation-aware
    ///   waits throw); if it returns its output anyway, the wait returns that output (the step
    ///   happened, and a saga must compensate it); if it throws, the wait throws an
    ///   ``ActivityFailure`` with reason `cancelled` carrying the attempt's error and the attempts made;
    /// - an activity with no attempt running (queued, or waiting for its next retry or for its
    ///   registration) ends at once as cancelled: no further attempt starts.
    ///
    /// So code that compensates after a cancellation knows what happened. The request survives a
    /// crash: at the next open, an activity whose cancellation was requested ends as cancelled without
    /// running again. An attempt that never checks for cancellation holds the wait until it ends (or
    /// until its timeouts end it).
    case waitCancellationCompleted = 1
    /// The wait throws at once, as with ``tryCancel``, but the activity is left alone: its attempts
    /// (and retries) go on, and its outcome is dropped when it arrives.
    case abandon = 2
}

/// Options of one activity call.
public struct ActivityOptions: Codable, Sendable, Hashable {
    public var retry: RetryPolicy
    /// The longest one attempt may run.
    public var startToCloseTimeout: Duration?
    /// The longest all attempts together may take, from scheduling.
    public var scheduleToCloseTimeout: Duration?
    /// The longest an attempt may go without a heartbeat.
    public var heartbeatTimeout: Duration?
    /// What cancelling the wait for the activity does; ``ActivityCancellationType/tryCancel`` by default.
    public var cancellationType: ActivityCancellationType

    public init(retry: RetryPolicy = .default, startToCloseTimeout: Duration? = nil, scheduleToCloseTimeout: Duration? = nil,
                heartbeatTimeout: Duration? = nil, cancellationType: ActivityCancellationType = .tryCancel) {
        self.retry = retry
        self.startToCloseTimeout = startToCloseTimeout
        self.scheduleToCloseTimeout = scheduleToCloseTimeout
        self.heartbeatTimeout = heartbeatTimeout
        self.cancellationType = cancellationType
    }

    private enum CodingKeys: String, CodingKey {
        case retry, startToCloseTimeout, scheduleToCloseTimeout, heartbeatTimeout, cancellationType
    }

    /// Options encoded before ``cancellationType`` existed decode with the default.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        retry = try container.decode(RetryPolicy.self, forKey: .retry)
        startToCloseTimeout = try container.decodeIfPresent(Duration.self, forKey: .startToCloseTimeout)
        scheduleToCloseTimeout = try container.decodeIfPresent(Duration.self, forKey: .scheduleToCloseTimeout)
        heartbeatTimeout = try container.decodeIfPresent(Duration.self, forKey: .heartbeatTimeout)
        cancellationType = try container.decodeIfPresent(ActivityCancellationType.self, forKey: .cancellationType) ?? .tryCancel
    }

    public static let `default` = ActivityOptions()

    /// Why the options are invalid, or `nil`: see ``RetryPolicy``; a timeout, when set, must be positive.
    var invalidity: String? {
        if let problem = retry.invalidity { return problem }
        func positive(_ timeout: Duration?, _ name: String) -> String? {
            guard let timeout, timeout <= .zero else { return nil }
            return "the \(name) timeout must be positive (got \(timeout))"
        }
        return positive(startToCloseTimeout, "start-to-close") ?? positive(scheduleToCloseTimeout, "schedule-to-close")
            ?? positive(heartbeatTimeout, "heartbeat")
    }

    /// Retries by `policy`, other options default.
    public static func retrying(_ policy: RetryPolicy) -> ActivityOptions { ActivityOptions(retry: policy) }
}

/// Thrown by an activity to stop the retries at once, whatever the policy.
public struct NonRetryableError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The attempt that ended an activity, recorded in its entity's history with the outcome
/// (``HistoryEvent/activityAttempt``): an activity's history is its `activityScheduled` event and one
/// outcome event that carries this, the attempt that started last. Failed attempts before it are not
/// events (their count is `number - 1`; the last one's error is in the failure), as in Temporal, whose
/// started event of a retried activity is written with its outcome.
public struct ActivityAttempt: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Its number: 1 for the first attempt. 0 when no attempt ran (the activity failed before one
    /// could: ``ActivityFailure/Reason/notRegistered``).
    public var number: Int
    /// When it started, ns on the runtime's clock; `nil` when not known: the attempt was cut off by a
    /// crash and counted as failed at the next open, without running again.
    public var startedAt: UInt64?

    public init(number: Int, startedAt: UInt64?) {
        self.number = number
        self.startedAt = startedAt
    }

    public var description: String {
        number == 0 ? "no attempt" : "attempt \(number)" + (startedAt.map { " started at \($0) ns" } ?? "")
    }
}

/// How an activity ended for good, as the run body sees it.
public struct ActivityFailure: Error, Codable, Sendable, Hashable, CustomStringConvertible {
    public enum Reason: String, Codable, Sendable, Hashable {
        /// The last attempt failed and the policy allowed no more (maximum attempts).
        case retriesExhausted
        /// The error's type is non-retryable.
        case nonRetryable
        /// A timeout ended the last attempt and no more were allowed.
        case startToCloseTimeout, scheduleToCloseTimeout, heartbeatTimeout
        /// No activity of that name was registered before the schedule-to-close timeout passed (without
        /// that timeout, a task waits for its activity's registration: after a restart, tasks are
        /// recovered before the application has registered everything).
        case notRegistered
        /// The wait for the activity was cancelled (the run was, or the task that awaited it). With
        /// ``ActivityCancellationType/tryCancel`` and ``ActivityCancellationType/abandon`` the wait
        /// ends at once and `attempts` is 0 (the run does not know how many ran); with
        /// ``ActivityCancellationType/waitCancellationCompleted`` the failure comes once the activity
        /// has ended, with the attempts made and the last one's error.
        case cancelled
    }

    public let activity: String
    public let reason: Reason
    /// How many attempts ran.
    public let attempts: Int
    /// The last attempt's error type and description.
    public let causeType: String
    public let cause: String

    public var isTimeout: Bool { [.startToCloseTimeout, .scheduleToCloseTimeout, .heartbeatTimeout].contains(reason) }
    /// The run stopped waiting for it because the run was cancelled.
    public var isCancelled: Bool { reason == .cancelled }

    public var description: String {
        "activity \(activity) failed (\(reason)) after \(attempts) attempt\(attempts == 1 ? "" : "s"): \(causeType): \(cause)"
    }
}

#if canImport(Glibc)
import Glibc
#endif
