import DequeModule
import Foundation
import Metrics

/// Work a shard runs: an entity cell with something in its mailbox.
protocol ShardWork: AnyObject, Sendable {
    /// Runs one turn on the shard's thread.
    func runTurn()
}

/// The scheduler's queue of entities that have something to do, oldest first, shared by every
/// shard's thread: whichever thread is free takes the oldest turn.
///
/// One queue rather than one per thread: with a thousand entities in flight, per-thread queues
/// (hashed, or the shorter one picked at enqueue) let a turn queued behind a thread that the OS
/// preempted, or behind a slower run of turns, be overtaken by hundreds queued later on the other
/// thread; in `saga-transfer` the slowest 1% of transfers had been overtaken by ~300 others on
/// average, against ~45 for the median one. Taking turns in arrival order across threads bounds
/// that to the turns running at once. An entity still has one turn at a time (its cell is queued
/// once until its turn ends), so its history order is its mailbox order whichever thread runs it.
///
/// It also paces the journal's commits (``CommitProducers``): while a turn is queued or running,
/// its submission is on its way, and a commit may wait for it; the thread that ends the last running
/// turn with nothing queued tells the journal (`onIdle`), so that a waiting commit starts at once.
///
/// `@unchecked Sendable`: all state is guarded by `condition`.
final class ReadyQueue: CommitProducers, @unchecked Sendable {
    private let condition = NSCondition()
    private var ready = Deque<any ShardWork>()
    /// Threads running a turn (from a ``pop(afterTurn:)`` that returned work to their next one).
    private var running = 0
    /// Told when the last running turn ended and nothing is queued.
    private let onIdle: (@Sendable () -> Void)?
    /// Threads waiting for work: a push wakes one only when some wait.
    private var sleepers = 0
    private var stopping = false
    /// Objects whose last references the shard threads drop (see ``retire(_:)``).
    private var retired: [AnyObject] = []
    /// How many retired objects may wait while every shard thread sleeps.
    static let retiredWhileIdle = 32

    init(onIdle: (@Sendable () -> Void)? = nil) {
        self.onIdle = onIdle
    }

    var areProducing: Bool {
        condition.lock()
        defer { condition.unlock() }
        return running > 0 || !ready.isEmpty
    }

    /// Queues `work`; returns how many works are queued. The caller guarantees it is not queued twice at once.
    func push(_ work: any ShardWork) -> Int {
        condition.lock()
        ready.append(work)
        let depth = ready.count
        if sleepers > 0 { condition.signal() }
        condition.unlock()
        return depth
    }

    /// The oldest work, waiting for one; `nil` once stopping and nothing is left. On the way it drops
    /// up to two retired objects (as many as a turn retires, with room to catch up); a thread with
    /// nothing to run drops them all before it waits.
    /// - Parameter afterTurn: the calling thread has just run a turn (the work its last call returned).
    func pop(afterTurn: Bool = false) -> (any ShardWork)? {
        condition.lock()
        if afterTurn {
            running -= 1
            if running == 0, ready.isEmpty, let onIdle {
                condition.unlock()
                onIdle()  // outside the lock: the journal's writer takes it while holding its own
                condition.lock()
            }
        }
        while ready.isEmpty && !stopping {
            if !retired.isEmpty {
                var dropping: [AnyObject] = []
                swap(&dropping, &retired)
                condition.unlock()
                dropping.removeAll()  // the last references go here, outside the lock
                condition.lock()
                continue
            }
            sleepers += 1
            condition.wait()
            sleepers -= 1
        }
        let work = ready.popFirst()
        if work != nil { running += 1 }
        let first = retired.popLast()
        let second = retired.popLast()
        condition.unlock()
        withExtendedLifetime((first, second)) {}  // released here, outside the lock
        return work
    }

    /// Hands over the last reference to `object`, allocated by turns, for a shard thread to drop
    /// between turns.
    ///
    /// Memory is freed most cheaply on the thread that allocates its like: glibc's per-thread cache
    /// hands a block freed there to the next allocation of its size. A finished run (its state, waits
    /// and command lists, built by turns) released on the commit-completion queue instead went
    /// back to a shard's arena under its lock, and the shards' next allocations of those sizes took
    /// the slow path; dropping such runs here, two after each turn, cut `saga-transfer`'s CPU a
    /// transfer by ~3% (see ``pop(afterTurn:)`` for when).
    func retire(_ object: AnyObject) {
        condition.lock()
        retired.append(object)
        if sleepers > 0, retired.count >= Self.retiredWhileIdle { condition.signal() }
        condition.unlock()
    }

    /// Lets the threads run what is queued, then return from ``pop(afterTurn:)`` with `nil`.
    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        condition.unlock()
    }
}

/// One shard of the mailbox scheduler: a thread that runs entity turns, one at a time, taken from
/// the ``ReadyQueue`` all shards share.
///
/// Entities hash to shards by name for residency (each shard's table of resident entities and its
/// share of `maxResidentEntities`, and the shard whose metrics count their turns); the turns
/// themselves go to the shared queue and run on whichever shard thread is free.
final class Shard: Sendable {
    let index: Int
    let queue: ReadyQueue
    /// Entities waiting for a turn (all shards).
    private let readyEntities: Gauge
    /// How long each turn takes on the shard's thread (commit not included).
    private let turnDuration: Metrics.Timer
    /// How many messages each turn takes from its entity's mailbox.
    let turnMessages: Recorder
    /// How many messages are left in an entity's mailbox after a turn took its share.
    let mailboxDepth: Recorder
    /// Left when the thread returns (see ``stop()``).
    private let running = DispatchGroup()

    init(index: Int, queue: ReadyQueue, metricsDimensions: [(String, String)] = []) {
        self.index = index
        self.queue = queue
        let dimensions = [("shard", "\(index)")] + metricsDimensions
        readyEntities = Gauge(label: "durable_entities_shard_ready_entities", dimensions: dimensions)
        turnDuration = Metrics.Timer(label: "durable_entities_turn_duration", dimensions: dimensions)
        turnMessages = Recorder(label: "durable_entities_turn_messages", dimensions: dimensions)
        mailboxDepth = Recorder(label: "durable_entities_mailbox_depth", dimensions: dimensions)
        running.enter()
        let thread = Thread { [self] in self.run() }
        thread.stackSize = 4 << 20
        thread.start()
    }

    /// Queues `work` for a turn (on any shard's thread). The caller guarantees it is not queued twice at once.
    func schedule(_ work: any ShardWork) {
        readyEntities.record(queue.push(work))
    }

    /// Runs what is queued, then waits for this shard's thread to stop.
    func stop() {
        queue.stop()
        running.wait()
    }

    private func run() {
        Thread.current.name = "de-shard-\(index)"  // shows in top -H, perf and gdb
        var ran = false
        while let work = queue.pop(afterTurn: ran) {
            ran = true
            let started = DispatchTime.now().uptimeNanoseconds
            work.runTurn()
            turnDuration.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - started))
        }
        running.leave()
    }
}
