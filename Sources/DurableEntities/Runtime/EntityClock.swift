#if canImport(Glibc)
import Glibc
#endif

/// Where the runtime's time comes from: recorded into every history event, and used for timers.
/// Tests inject a clock that moves only when told (see `DurableEntitiesTesting`).
public protocol EntityClock: Sendable {
    /// Now, in nanoseconds since the Unix epoch.
    func nowNanoseconds() -> UInt64

    /// How long the timer service may wait in real time for `deadline` (on this clock) to pass, or
    /// `nil` to wait until the clock tells its observers that it moved.
    func realWait(until deadline: UInt64) -> Duration?

    /// Calls `observer` whenever the clock moves by other means than real time (a test clock).
    func observe(_ observer: @escaping @Sendable () -> Void)

    /// Asked when the runtime is idle and its earliest timer is due at `deadline`: a test clock may
    /// jump there (returns `true`), a real one does not.
    func advanceWhenIdle(to deadline: UInt64) -> Bool
}

extension EntityClock {
    public func realWait(until deadline: UInt64) -> Duration? {
        let now = nowNanoseconds()
        return deadline > now ? .nanoseconds(Int64(min(deadline - now, UInt64(Int64.max)))) : .zero
    }
    public func observe(_ observer: @escaping @Sendable () -> Void) {}
    public func advanceWhenIdle(to deadline: UInt64) -> Bool { false }
}

/// The system's real-time clock.
public struct SystemEntityClock: EntityClock {
    public init() {}
    public func nowNanoseconds() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
    }
}
