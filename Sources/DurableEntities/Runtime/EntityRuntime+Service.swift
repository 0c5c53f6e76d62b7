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
    ///
    /// If the journal stops first (a fatal storage failure, see ``failure``), it closes the runtime
    /// and throws that failure: the `ServiceGroup` ends, and a supervisor (systemd, Kubernetes)
    /// restarts the process, whose open recovers everything acknowledged.
    public func run() async throws {
        let failure = await withTaskGroup(of: EntityError?.self) { group in
            group.addTask {
                try? await gracefulShutdown()
                return nil
            }
            group.addTask { await self.untilStopped() }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
        await shutdown()
        if let failure { throw failure }
    }

    /// Returns ``failure`` once the journal stops; `nil` if the calling task is cancelled first.
    func untilStopped() async -> EntityError? {
        let (stopped, stop) = AsyncStream.makeStream(of: EntityError.self)
        core.journal.whenStopped { error in
            stop.yield(Self.failure(error))
            stop.finish()
        }
        return await stopped.first { _ in true }
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
