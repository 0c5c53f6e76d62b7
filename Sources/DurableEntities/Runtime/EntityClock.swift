#if canImport(Glibc)
import Glibc
#endif

/// Where the runtime's time comes from: recorded into every history event, and used for timers.
/// Tests inject a clock that moves only when told (see `DurableEntitiesTesting`).
public protocol EntityClock: Sendable {
    /// Now, in nanoseconds since the Unix epoch.
    func nowNanoseconds() -> UInt64
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
