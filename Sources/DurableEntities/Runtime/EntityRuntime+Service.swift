import Dispatch
import Synchronization
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
        await shutdown()
    }

    /// ``close()`` for async code: the same steps, waited for without blocking a thread of the
    /// cooperative pool (the activity attempts that close lets finish run there).
    ///
    /// When it returns, the close holds no reference to the runtime any more: a runtime the caller
    /// releases next leaves memory then (the block that closes it gives its reference up first).
    public func shutdown() async {
        let closing = Mutex<EntityRuntime?>(self)
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async {
                do {
                    let runtime = closing.withLock { $0.take() }
                    runtime?.close()
                }  // released here, before the caller resumes
                done.resume()
            }
        }
    }
}
