import Dispatch
import Synchronization

/// Resumes a continuation with the first result given, ignores the others.
public final class ResumeOnce<T: Sendable>: Sendable {
    private let continuation: Mutex<CheckedContinuation<T, any Error>?>
    public init(_ continuation: CheckedContinuation<T, any Error>) { self.continuation = Mutex(continuation) }
    public func resume(_ result: Result<T, any Error>) { continuation.withLock { $0.take() }?.resume(with: result) }
}

public struct DeadlineExceeded: Error, CustomStringConvertible {
    public let seconds: Double
    /// The wait's place in the test (file and line).
    public var place = ""
    public var description: String { "no answer within \(seconds) s" + (place.isEmpty ? "" : " (the wait at \(place))") }
}

/// Awaits `operation` for at most `seconds`: a watchdog (not a synchronisation), so that a hang — a
/// task never re-dispatched, an outcome never recorded — fails the test instead of hanging it. The
/// operation is left running if the deadline passes.
public func withDeadline<T: Sendable>(seconds: Double, fileID: String = #fileID, line: Int = #line,
                                       _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let once = ResumeOnce(continuation)
        Task {
            do { once.resume(.success(try await operation())) } catch { once.resume(.failure(error)) }
        }
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { once.resume(.failure(DeadlineExceeded(seconds: seconds, place: "\(fileID):\(line)"))) }
    }
}
