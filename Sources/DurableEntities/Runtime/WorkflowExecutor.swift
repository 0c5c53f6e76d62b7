import DequeModule
import Synchronization

/// The executor a run body's tasks prefer: it runs nothing by itself. Jobs queue until the entity's
/// shard drains them inside a turn, in the order they were enqueued. Since the runtime resumes the
/// body's waits in history order, one history always gives one interleaving — child tasks
/// (`async let`, task groups) included, as they inherit the preference.
final class WorkflowExecutor: TaskExecutor, @unchecked Sendable {
    private let jobs = Mutex(Deque<UnownedJob>())

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        jobs.withLock { $0.append(job) }
    }

    /// Runs queued jobs until none is left; returns whether any ran.
    @discardableResult
    func drain() -> Bool {
        var ran = false
        while let job = jobs.withLock({ $0.popFirst() }) {
            job.runSynchronously(on: asUnownedTaskExecutor())
            ran = true
        }
        return ran
    }
}
