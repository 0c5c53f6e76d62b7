import Dispatch
import ServiceLifecycle

extension EntityRuntime: Service {
    /// Runs until a graceful shutdown is requested (SIGTERM through a `ServiceGroup`, or the task is
    /// cancelled), then stops taking messages, finishes every queued and in-flight turn (their senders
    /// get their answers), and closes the journal.
    ///
    /// ```swift
    /// let group = ServiceGroup(services: [runtime, httpServer], gracefulShutdownSignals: [.sigterm], logger: logger)
    /// try await group.run()
    /// ```
    public func run() async throws {
        try? await gracefulShutdown()
        // close() blocks until the last turn has committed: keep it off the cooperative pool.
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async {
                self.close()
                done.resume()
            }
        }
    }
}
