/// Measures elapsed time on the monotonic `ContinuousClock`.
///
/// ```swift
/// let watch = Stopwatch()
/// try await work()
/// print(watch.elapsed.seconds)
/// ```
struct Stopwatch: Sendable {
    /// The instant the stopwatch was started.
    private(set) var started: ContinuousClock.Instant

    /// Starts a stopwatch now.
    init() { started = .now }

    /// Time since the stopwatch was started (or last restarted).
    var elapsed: Duration { .now - started }

    /// Restarts from now and returns the time elapsed before the restart (a lap).
    @discardableResult
    mutating func restart() -> Duration {
        let now = ContinuousClock.Instant.now
        defer { started = now }
        return now - started
    }

    /// Runs `body` and returns its result with the time it took.
    static func time<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: () async throws -> T
    ) async rethrows -> (result: T, elapsed: Duration) {
        let start = ContinuousClock.Instant.now
        let result = try await body()
        return (result, .now - start)
    }
}

extension Duration {
    /// Whole nanoseconds, clamped to `0...UInt64.max` (a negative duration gives 0).
    var nanosecondsClamped: UInt64 {
        let (seconds, attoseconds) = components
        if seconds < 0 { return 0 }
        if seconds >= 9_000_000_000 { return .max }  // beyond Int64 nanoseconds (~285 years)
        let total = seconds * 1_000_000_000 + attoseconds / 1_000_000_000
        return total <= 0 ? 0 : UInt64(total)
    }

    /// The duration in seconds, as a `Double`.
    var seconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) * 1e-18
    }

    /// The duration in milliseconds, as a `Double`.
    var milliseconds: Double { seconds * 1_000 }
}
