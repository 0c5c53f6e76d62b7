import Foundation
import Synchronization
import Testing

@testable import DurableEntities

/// Commit pacing: while the journal's producers report work on its way, a commit waits for their
/// submissions — until they go idle, a full batch waits, the journal closes, or the window passes.
@Suite("Commit pacing")
struct CommitPacingTests {
    /// Producers whose answer the test sets; each time the writer asks, `asked` is signalled.
    final class Producers: CommitProducers {
        private let producing = Atomic<Bool>(true)
        let asked = DispatchSemaphore(value: 0)
        var areProducing: Bool {
            asked.signal()
            return producing.load(ordering: .acquiring)
        }
        func stop() { producing.store(false, ordering: .releasing) }
    }

    /// Results of submissions, in arrival order.
    final class Results: Sendable {
        private let results = Mutex<[Result<CommitReceipt, JournalError>]>([])
        private let indices = Mutex<[Int]>([])
        let arrived = DispatchSemaphore(value: 0)
        func add(_ result: Result<CommitReceipt, JournalError>, index: Int? = nil) {
            if let index { indices.withLock { $0.append(index) } }
            results.withLock { $0.append(result) }
            arrived.signal()
        }
        /// The indices given to ``CommitPacingTests/submitFirstEvent(of:to:results:index:)``, in completion order.
        var order: [Int] { indices.withLock { $0 } }
        var all: [Result<CommitReceipt, JournalError>] { results.withLock { $0 } }
        var allSucceeded: Bool { all.allSatisfy { if case .success = $0 { true } else { false } } }
        /// Waits for `count` results (at most 10 s each).
        func wait(for count: Int) -> Bool {
            (0..<count).allSatisfy { _ in arrived.wait(timeout: .now() + 10) == .success }
        }
    }

    /// A journal with `count` registered entities, paced by `producers` from now on.
    func pacedJournal(_ directory: TemporaryDirectory, window: Duration, maxOperations: Int = 16_384, entities count: Int,
                      producers: Producers) async throws -> (Journal, [EntityKey]) {
        let journal = try Journal(configuration: .init(directory: directory.path, maxOperationsPerCommit: maxOperations,
                                                       commitWindow: window, logger: quietLogger))
        var keys: [EntityKey] = []
        for index in 0..<count { keys.append(try await journal.register(EntityName(type: "Account", id: "a\(index)"))) }
        journal.pace(with: producers)
        return (journal, keys)
    }

    /// Submits the first event of `key`; its completion records `index`, if given, in `results.order`.
    func submitFirstEvent(of key: EntityKey, to journal: Journal, results: Results, index: Int? = nil) {
        var batch = JournalBatch()
        batch.append(key, sequence: 1, payload: Array("event of \(key.rawValue)".utf8))
        journal.submit(batch) { results.add($0, index: index) }
    }

    @Test("while the producers work, a commit waits for their submissions; once they go idle, it takes them all in one commit")
    func waitsForBusyProducers() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let producers = Producers()
        // A window of an hour: only the producers' going idle can end the wait within the test.
        let (journal, keys) = try await pacedJournal(directory, window: .seconds(3_600), entities: 3, producers: producers)
        defer { journal.close() }
        let before = journal.statistics.commits
        let results = Results()
        submitFirstEvent(of: keys[0], to: journal, results: results)
        // The writer has the first submission and asks whether more are coming: it waits.
        #expect(producers.asked.wait(timeout: .now() + 10) == .success)
        submitFirstEvent(of: keys[1], to: journal, results: results)
        submitFirstEvent(of: keys[2], to: journal, results: results)
        #expect(results.all.isEmpty)
        producers.stop()
        journal.producersIdle()
        #expect(results.wait(for: 3))
        #expect(results.allSucceeded)
        #expect(journal.statistics.commits - before == 1)
        for key in keys { #expect(try journal.latestSequence(of: key) == 1) }
    }

    @Test("a commit waits no longer than the window after the previous one started, even if the producers never stop")
    func windowBoundsTheWait() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let producers = Producers()  // producing for ever
        let (journal, keys) = try await pacedJournal(directory, window: .milliseconds(20), entities: 4, producers: producers)
        defer { journal.close() }
        let results = Results()
        for key in keys {
            submitFirstEvent(of: key, to: journal, results: results)
            #expect(results.wait(for: 1))
        }
        #expect(results.allSucceeded)
        for key in keys { #expect(try journal.latestSequence(of: key) == 1) }
    }

    @Test("a full batch does not wait: once maxOperationsPerCommit operations are queued, they commit")
    func fullBatchCommits() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let producers = Producers()  // producing for ever
        let (journal, keys) = try await pacedJournal(directory, window: .seconds(3_600), maxOperations: 4, entities: 4,
                                                     producers: producers)
        defer { journal.close() }
        let before = journal.statistics.commits
        let results = Results()
        submitFirstEvent(of: keys[0], to: journal, results: results)
        #expect(producers.asked.wait(timeout: .now() + 10) == .success)
        for key in keys.dropFirst() { submitFirstEvent(of: key, to: journal, results: results) }
        #expect(results.wait(for: 4))
        #expect(results.allSucceeded)
        #expect(journal.statistics.commits - before == 1)
    }

    @Test("more than a full batch queued: the first maxOperationsPerCommit operations commit, in order; the rest wait for the next commit")
    func overfullQueueSplits() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let producers = Producers()  // producing until the test stops them
        let (journal, keys) = try await pacedJournal(directory, window: .seconds(3_600), maxOperations: 4, entities: 6,
                                                     producers: producers)
        defer { journal.close() }
        let before = journal.statistics.commits
        let results = Results()
        func submit(_ index: Int) { submitFirstEvent(of: keys[index], to: journal, results: results, index: index) }
        submit(0)
        #expect(producers.asked.wait(timeout: .now() + 10) == .success)
        for index in 1..<6 { submit(index) }
        // The fourth operation fills a batch: it commits without the two after it, which wait for
        // the producers (an hour's window).
        #expect(results.wait(for: 4))
        #expect(journal.statistics.commits - before == 1)
        #expect(results.order == [0, 1, 2, 3])
        producers.stop()
        journal.producersIdle()
        #expect(results.wait(for: 2))
        #expect(results.allSucceeded)
        #expect(journal.statistics.commits - before == 2)
        #expect(results.order == [0, 1, 2, 3, 4, 5])
        for key in keys { #expect(try journal.latestSequence(of: key) == 1) }
    }

    @Test("closing commits what a paced commit holds, at once")
    func closeCommitsWhatWaits() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let producers = Producers()  // producing for ever
        let (journal, keys) = try await pacedJournal(directory, window: .seconds(3_600), entities: 1, producers: producers)
        let results = Results()
        submitFirstEvent(of: keys[0], to: journal, results: results)
        #expect(producers.asked.wait(timeout: .now() + 10) == .success)
        journal.close()
        #expect(results.wait(for: 1))
        #expect(results.allSucceeded)
        let reopened = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { reopened.close() }
        #expect(try reopened.latestSequence(of: keys[0]) == 1)
    }

    /// A journal with `count` entities registered (before the linger applies: registering commits
    /// too), reopened with a commit linger and without producers.
    func lingeringJournal(_ directory: TemporaryDirectory, linger: Duration, maxOperations: Int = 16_384,
                          entities count: Int) async throws -> (Journal, [EntityKey]) {
        let plain = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        var keys: [EntityKey] = []
        for index in 0..<count { keys.append(try await plain.register(EntityName(type: "Account", id: "a\(index)"))) }
        plain.close()
        let journal = try Journal(configuration: .init(directory: directory.path, maxOperationsPerCommit: maxOperations,
                                                       commitLinger: linger, logger: quietLogger))
        return (journal, keys)
    }

    @Test("a linger holds each commit but the first, with no producers at all, until a full batch waits; closing commits what it holds")
    func lingerHoldsCommits() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        // A linger of an hour: only a full batch or closing can release a commit within the test.
        let (journal, keys) = try await lingeringJournal(directory, linger: .seconds(3_600), maxOperations: 4, entities: 6)
        let before = journal.statistics.commits
        let results = Results()
        func submit(_ index: Int) { submitFirstEvent(of: keys[index], to: journal, results: results, index: index) }
        // The first commit after opening does not wait.
        submit(0)
        #expect(results.wait(for: 1))
        #expect(journal.statistics.commits - before == 1)
        // The next waits out the linger, or a full batch: submitted one by one, four make one commit.
        for index in 1...4 { submit(index) }
        #expect(results.wait(for: 4))
        #expect(journal.statistics.commits - before == 2)
        #expect(results.order == [0, 1, 2, 3, 4])
        submit(5)
        journal.close()
        #expect(results.wait(for: 1))
        #expect(results.allSucceeded)
        #expect(journal.statistics.commits - before == 3)
        let reopened = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { reopened.close() }
        for key in keys { #expect(try reopened.latestSequence(of: key) == 1) }
    }

    @Test("a short linger ends by itself: each commit starts once the linger after the previous one has passed")
    func lingerEnds() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let (journal, keys) = try await lingeringJournal(directory, linger: .milliseconds(20), entities: 4)
        defer { journal.close() }
        let before = journal.statistics.commits
        let results = Results()
        for key in keys {
            submitFirstEvent(of: key, to: journal, results: results)
            #expect(results.wait(for: 1))
        }
        #expect(results.allSucceeded)
        #expect(journal.statistics.commits - before == 4)
        for key in keys { #expect(try journal.latestSequence(of: key) == 1) }
    }

    @Test("the shards' ready queue produces while a turn is queued or running, and the end of the last running turn with nothing queued says so once")
    func readyQueueReportsProducing() throws {
        let idle = DispatchSemaphore(value: 0)
        let queue = ReadyQueue { idle.signal() }
        #expect(!queue.areProducing)
        let log = ReadyQueueTests.Log()
        let gate = DispatchSemaphore(value: 0)
        let shard = Shard(index: 0, queue: queue)
        shard.schedule(ReadyQueueTests.Work(0, log: log, gate: gate))
        #expect(log.started.wait(timeout: .now() + 10) == .success)
        #expect(queue.areProducing)  // running
        shard.schedule(ReadyQueueTests.Work(1, log: log))
        #expect(queue.areProducing)  // running, and one queued
        gate.signal()
        #expect(idle.wait(timeout: .now() + 10) == .success)
        #expect(log.order == [0, 1])
        #expect(!queue.areProducing)
        // The first turn ended with the second queued: that was not idle, so there is no second call.
        #expect(idle.wait(timeout: .now()) == .timedOut)
        shard.stop()
    }

    @Test("with a window of an hour, the runtime's commits still complete: the shards going idle releases each")
    func runtimeReleasesCommitsWhenIdle() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = EntityRuntime.Configuration(directory: directory.path, logger: quietLogger)
        configuration.journal.logger = quietLogger
        configuration.journal.commitWindow = .seconds(3_600)
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<20 {
                group.addTask {
                    let account = runtime.entity(Account.self, id: "a\(index)")
                    for _ in 0..<5 { try await account.signal(.deposit(1)) }
                }
            }
            try await group.waitForAll()
        }
        for index in 0..<20 { #expect(try await runtime.entity(Account.self, id: "a\(index)").query(\.balance) == 5) }
    }
}
