import DequeModule
import Foundation
import Metrics
import Synchronization

/// Work a shard runs: an entity cell with something in its mailbox.
protocol ShardWork: AnyObject, Sendable {
    /// Runs one turn on the shard's thread.
    func runTurn()
}

/// One shard of the mailbox scheduler: a thread that runs entity turns, one at a time, from a queue
/// of entities that have messages.
///
/// Entities hash to shards by name for residency (each shard's table of resident entities and its
/// share of `maxResidentEntities`), but a turn is queued on whichever shard has the shorter queue
/// (``RuntimeCore/schedule(_:home:)``): with a thousand entities in flight, hashing alone left one
/// shard with ~900 queued turns while the other sat idle (measured in `saga-transfer`), and the
/// waits in the long queue set the latency tail. An entity still has one turn at a time, so its
/// history order is its mailbox order whichever thread runs the turn.
///
/// `@unchecked Sendable`: the queue is guarded by `condition`; ``depth`` mirrors its length for
/// readers that do not take the lock.
final class Shard: @unchecked Sendable {
    let index: Int
    /// Entities waiting for a turn on this shard.
    private let readyEntities: Gauge
    /// How long each turn takes on the shard's thread (commit not included).
    private let turnDuration: Metrics.Timer
    /// How many messages each turn takes from its entity's mailbox.
    let turnMessages: Recorder
    /// How many messages are left in an entity's mailbox after a turn took its share.
    let mailboxDepth: Recorder
    private let condition = NSCondition()
    private var ready = Deque<any ShardWork>()
    private var stopping = false
    private var stopped = false
    /// How many works are queued, written under the lock and read without it to pick a queue.
    let depth = Atomic<Int>(0)

    init(index: Int) {
        self.index = index
        let dimensions = [("shard", "\(index)")]
        readyEntities = Gauge(label: "durable_entities_shard_ready_entities", dimensions: dimensions)
        turnDuration = Metrics.Timer(label: "durable_entities_turn_duration", dimensions: dimensions)
        turnMessages = Recorder(label: "durable_entities_turn_messages", dimensions: dimensions)
        mailboxDepth = Recorder(label: "durable_entities_mailbox_depth", dimensions: dimensions)
        let thread = Thread { [unowned self] in self.run() }
        thread.stackSize = 4 << 20
        thread.start()
    }

    /// Queues `work` for a turn. The caller guarantees it is not queued twice at once.
    func schedule(_ work: any ShardWork) {
        condition.lock()
        ready.append(work)
        let depth = ready.count
        self.depth.store(depth, ordering: .relaxed)
        if depth == 1 { condition.signal() }
        condition.unlock()
        readyEntities.record(depth)
    }

    /// Runs what is queued, then stops the thread.
    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        while !stopped { condition.wait() }
        condition.unlock()
    }

    private func run() {
        Thread.current.name = "de-shard-\(index)"  // shows in top -H, perf and gdb
        while true {
            condition.lock()
            while ready.isEmpty && !stopping { condition.wait() }
            guard let work = ready.popFirst() else {
                stopped = true
                condition.broadcast()
                condition.unlock()
                return
            }
            depth.store(ready.count, ordering: .relaxed)
            condition.unlock()
            let started = DispatchTime.now().uptimeNanoseconds
            work.runTurn()
            turnDuration.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - started))
        }
    }
}
