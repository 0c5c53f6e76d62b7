import DurableEntities
import Synchronization

/// A clock for tests: time moves only when the test says so, or — with `skipsTimeWhenIdle` — jumps
/// straight to the next durable timer whenever every entity of the runtime is waiting. A 24-hour
/// approval wait or a five-attempt backoff then completes in milliseconds of real time.
///
/// ## Usage
/// ```swift
/// let clock = TestClock()
/// let runtime = try EntityRuntime(configuration: .init(directory: dir, clock: clock))
/// try await approval.start(input)
/// clock.advance(by: .seconds(3_600))          // or let it skip on its own
/// ```
public final class TestClock: EntityClock, Sendable {
    private struct State {
        var now: UInt64
        var skips: Bool
        var observers: [@Sendable () -> Void] = []
    }
    private let state: Mutex<State>

    /// Whether the clock jumps to the next timer when the runtime is idle. Turning it on lets a test
    /// first look at an entity waiting on a timer, then let every wait run out.
    public var skipsTimeWhenIdle: Bool {
        get { state.withLock { $0.skips } }
        set {
            let observers = state.withLock { state -> [@Sendable () -> Void] in
                state.skips = newValue
                return state.observers
            }
            for observer in observers { observer() }
        }
    }

    /// - Parameters:
    ///   - startNanoseconds: the starting time, in nanoseconds since the Unix epoch (default: 2026-01-01).
    ///   - skipsTimeWhenIdle: jump to the next timer whenever every entity waits.
    public init(startNanoseconds: UInt64 = 1_767_225_600_000_000_000, skipsTimeWhenIdle: Bool = true) {
        state = Mutex(State(now: startNanoseconds, skips: skipsTimeWhenIdle))
    }

    public func nowNanoseconds() -> UInt64 { state.withLock { $0.now } }

    /// The timer service never waits in real time for this clock: only for it to move.
    public func realWait(until deadline: UInt64) -> Duration? { nil }

    public func observe(_ observer: @escaping @Sendable () -> Void) {
        state.withLock { $0.observers.append(observer) }
    }

    public func advanceWhenIdle(to deadline: UInt64) -> Bool {
        state.withLock { state in
            guard state.skips else { return false }
            state.now = max(state.now, deadline)
            return true
        }
    }

    /// Moves the clock forward; due timers fire.
    public func advance(by duration: Duration) {
        let (seconds, attoseconds) = duration.components
        let nanoseconds = UInt64(max(0, seconds)) * 1_000_000_000 + UInt64(max(0, attoseconds) / 1_000_000_000)
        let observers = state.withLock { state -> [@Sendable () -> Void] in
            state.now += nanoseconds
            return state.observers
        }
        for observer in observers { observer() }
    }
}
