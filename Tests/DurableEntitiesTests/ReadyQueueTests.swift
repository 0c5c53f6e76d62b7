import Foundation
import Synchronization
import Testing

@testable import DurableEntities

/// The scheduler's shared ready queue: turns start oldest first on whichever shard thread is free.
@Suite("Shard ready queue")
struct ReadyQueueTests {
    /// A turn that records its number and, for the one marked `blocking`, waits until released.
    final class Work: ShardWork {
        let number: Int
        let log: Log
        let gate: DispatchSemaphore?
        init(_ number: Int, log: Log, gate: DispatchSemaphore? = nil) {
            self.number = number
            self.log = log
            self.gate = gate
        }
        func runTurn() {
            log.started(number, on: ReadyQueueTests.currentThread)
            gate?.wait()
        }
    }

    /// The calling thread's identity. Not `Thread.current.name`: once, in CI, a shard thread's
    /// name read back as the name of the thread that created it.
    static var currentThread: String { "\(pthread_self())" }

    final class Log: Sendable {
        private let entries = Mutex<[(Int, String)]>([])
        /// Signalled once per started turn.
        let started = DispatchSemaphore(value: 0)
        func started(_ number: Int, on thread: String) {
            entries.withLock { $0.append((number, thread)) }
            started.signal()
        }
        var order: [Int] { entries.withLock { $0.map(\.0) } }
        var threads: [String] { entries.withLock { $0.map(\.1) } }
    }

    @Test("a turn that holds its thread does not hold up the turns queued after it: the other shard runs them, oldest first")
    func busyThreadDoesNotHoldUpOthers() throws {
        let queue = ReadyQueue()
        let shards = (0..<2).map { Shard(index: $0, queue: queue) }
        let log = Log()
        let gate = DispatchSemaphore(value: 0)
        // Queued on shard 0 (the entity's home, say): the first turn blocks one thread.
        shards[0].schedule(Work(0, log: log, gate: gate))
        #expect(log.started.wait(timeout: .now() + 10) == .success)
        // Every later turn is queued through the blocked thread's shard; the free thread runs them all.
        for number in 1...200 { shards[0].schedule(Work(number, log: log)) }
        for _ in 1...200 {
            guard log.started.wait(timeout: .now() + 10) == .success else {
                Issue.record("the turns queued after a blocked one did not run")
                break
            }
        }
        #expect(log.order == Array(0...200))
        let busy = log.threads[0]
        #expect(log.threads.dropFirst().allSatisfy { $0 != busy })
        gate.signal()
        for shard in shards { shard.stop() }
    }

    /// Signals `dropped` from its deinit, with the name of the thread that dropped it.
    final class Retired: Sendable {
        let dropped: Log
        init(_ dropped: Log) { self.dropped = dropped }
        deinit { dropped.started(0, on: ReadyQueueTests.currentThread) }
    }

    @Test("retired objects are dropped two per turn taken, and all of them by a thread that finds nothing to run")
    func retiredObjectsAreDropped() throws {
        // Without shard threads: each pop that finds work drops two.
        let queue = ReadyQueue()
        let dropped = Log()
        let log = Log()
        _ = queue.push(Work(0, log: log))
        _ = queue.push(Work(1, log: log))
        for _ in 0..<5 { queue.retire(Retired(dropped)) }
        #expect(dropped.order.isEmpty)
        #expect(queue.pop() != nil)
        #expect(dropped.order.count == 2)
        #expect(queue.pop() != nil)
        #expect(dropped.order.count == 4)
        for _ in 0..<4 { dropped.started.wait() }  // signalled already

        // A shard thread with nothing to run drops the one left before it waits…
        let shard = Shard(index: 0, queue: queue)
        #expect(dropped.started.wait(timeout: .now() + 10) == .success)
        #expect(dropped.order.count == 5)
        let shardThread = dropped.threads[4]
        #expect(shardThread != Self.currentThread)
        // …and, while it sleeps, wakes to drop them once enough wait.
        let batch = ReadyQueue.retiredWhileIdle
        for _ in 0..<batch { queue.retire(Retired(dropped)) }
        for _ in 0..<batch {
            guard dropped.started.wait(timeout: .now() + 10) == .success else {
                Issue.record("retired objects were not dropped while the shard idled")
                break
            }
        }
        #expect(dropped.order.count == 5 + batch)
        // By the shard's thread — save an object whose retiring caller still held it when the thread
        // dropped the queue's reference (the caller's reference is then the last).
        let byShard = dropped.threads.dropFirst(5).filter { $0 == shardThread }.count
        #expect(byShard > batch / 2, "\(dropped.threads)")
        shard.stop()
    }

    @Test("stopping runs what is queued first, on every thread, then returns")
    func stopDrains() throws {
        let queue = ReadyQueue()
        let shards = (0..<3).map { Shard(index: $0, queue: queue) }
        let log = Log()
        for number in 0..<500 { shards[number % 3].schedule(Work(number, log: log)) }
        for shard in shards { shard.stop() }
        #expect(log.order.count == 500)
        #expect(Set(log.order) == Set(0..<500))
    }
}
