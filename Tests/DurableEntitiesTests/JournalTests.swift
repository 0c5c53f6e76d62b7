@testable import DurableEntities
import Foundation
import LMDB
import Synchronization
import TestSupport
import Testing

@Suite("Journal")
struct JournalTests {
    @Test("appends survive close and reopen, across coalesced moves and the log window (recent records: off, a tiny ring that wraps, the default)",
          arguments: [0, 256, Journal.Configuration(directory: "").recentRecordBytes])
    func appendsSurviveReopen(recentRecordBytes: Int) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        // Small threshold and window, so events are spread over log, moves and history.
        var configuration = Journal.Configuration(directory: directory.path, coalesceThreshold: 4, logWindow: 64, logger: quietLogger)
        configuration.recentRecordBytes = recentRecordBytes
        var keys: [EntityKey] = []
        do {
            let journal = try Journal(configuration: configuration)
            for i in 0..<20 { keys.append(try await journal.register(EntityName(type: "Account", id: "a\(i)"))) }
            #expect(Set(keys).count == 20)
            // Registration is idempotent.
            #expect(try await journal.register(EntityName(type: "Account", id: "a3")) == keys[3])
            for round in 1...30 {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for (index, key) in keys.enumerated() where (index + round) % 3 != 0 || round == 1 {
                        group.addTask {
                            let next = try journal.latestSequence(of: key) + 1
                            var batch = JournalBatch()
                            batch.append(key, sequence: next, payload: bytes("\(key.rawValue):\(next)"))
                            _ = try await journal.commit(batch)
                        }
                    }
                    try await group.waitForAll()
                }
            }
            try checkHistories(journal, keys)
            journal.close()
        }
        let reopened = try Journal(configuration: configuration)
        defer { reopened.close() }
        try checkHistories(reopened, keys)
        #expect(try reopened.key(for: EntityName(type: "Account", id: "a7")) == keys[7])
        #expect(try reopened.metadata(of: keys[7])?.name == EntityName(type: "Account", id: "a7"))
        // Appends continue where they stopped.
        let next = try reopened.latestSequence(of: keys[0]) + 1
        var batch = JournalBatch()
        batch.append(keys[0], sequence: next, payload: bytes("\(keys[0].rawValue):\(next)"))
        _ = try await reopened.commit(batch)
        try checkHistories(reopened, keys)
    }

    private func checkHistories(_ journal: Journal, _ keys: [EntityKey]) throws {
        for key in keys {
            let events = try journal.events(of: key)
            let latest = try journal.latestSequence(of: key)
            #expect(latest > 0)
            #expect(events.map(\.sequence) == Array(1...latest))
            for event in events { #expect(event.payload == bytes("\(key.rawValue):\(event.sequence)")) }
            // Partial ranges.
            let middle = try journal.events(of: key, from: 2, through: 3)
            #expect(middle.map(\.sequence) == Array(2...min(3, latest)))
        }
    }

    @Test("a non-consecutive append is refused alone; the rest of the group commit lands")
    func nonConsecutiveAppendIsRejected() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { journal.close() }
        let alice = try await journal.register(EntityName(type: "Account", id: "alice"))
        let bob = try await journal.register(EntityName(type: "Account", id: "bob"))

        var first = JournalBatch()
        first.append(alice, sequence: 1, payload: bytes("a1"))
        _ = try await journal.commit(first)

        // A gap, a repeat, and a valid batch, submitted together so they share one transaction.
        var gapBatch = JournalBatch()
        gapBatch.append(alice, sequence: 3, payload: bytes("x"))
        var repeatBatch = JournalBatch()
        repeatBatch.append(alice, sequence: 1, payload: bytes("x"))
        var validBatch = JournalBatch()
        validBatch.append(bob, sequence: 1, payload: bytes("b1"))
        validBatch.append(bob, sequence: 2, payload: bytes("b2"))
        async let gap = Result { try await journal.commit(gapBatch) }
        async let repeated = Result { try await journal.commit(repeatBatch) }
        async let valid = Result { try await journal.commit(validBatch) }

        for outcome in await [gap, repeated] {
            guard case .failure(let error as JournalError) = outcome else {
                Issue.record("expected a refusal, got \(outcome)")
                continue
            }
            #expect(error.code == .nonConsecutiveSequence)
            #expect(error.entity == EntityName(type: "Account", id: "alice"))
            #expect(error.sequence != nil)
        }
        _ = try await valid.get()
        #expect(try journal.events(of: alice).map(\.payload) == [bytes("a1")])
        #expect(try journal.events(of: bob).map(\.payload) == [bytes("b1"), bytes("b2")])

        // A batch is all or nothing: a bad second append leaves the first unwritten.
        var mixed = JournalBatch()
        mixed.append(alice, sequence: 2, payload: bytes("a2"))
        mixed.append(alice, sequence: 4, payload: bytes("a4"))
        await #expect(throws: JournalError.self) { try await journal.commit(mixed) }
        #expect(try journal.latestSequence(of: alice) == 1)

        // Unknown entity keys and oversized payloads are refused with their own codes.
        var unknown = JournalBatch()
        unknown.append(EntityKey(rawValue: 999), sequence: 1, payload: [])
        let unknownError = await #expect(throws: JournalError.self) { try await journal.commit(unknown) }
        #expect(unknownError?.code == .unknownEntity)
    }

    @Test("oversized payloads are refused and nothing is written")
    func oversizedPayload() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, maxPayloadBytes: 1_000, logger: quietLogger))
        defer { journal.close() }
        let key = try await journal.register(EntityName(type: "Cart", id: "c1"))
        var batch = JournalBatch()
        batch.append(key, sequence: 1, payload: [UInt8](repeating: 7, count: 1_001))
        let error = await #expect(throws: JournalError.self) { try await journal.commit(batch) }
        #expect(error?.code == .payloadTooLarge)
        #expect(error?.sequence == 1)
        #expect(try journal.latestSequence(of: key) == 0)
    }

    @Test("snapshots, retention, timers (by due time, from a due time on, filtered), idempotency results and metadata round-trip")
    func sideTables() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, coalesceThreshold: 3, logger: quietLogger)
        let key: EntityKey
        do {
            let journal = try Journal(configuration: configuration)
            key = try await journal.register(EntityName(type: "Order", id: "o-1"))
            var batch = JournalBatch()
            for sequence in 1...10 { batch.append(key, sequence: UInt64(sequence), payload: bytes("e\(sequence)")) }
            batch.saveSnapshot(key, sequence: 8, payload: bytes("state@8"))
            batch.scheduleTimer(JournalTimer(dueNanoseconds: 2_000, entity: key, id: 2, payload: bytes("late")))
            batch.scheduleTimer(JournalTimer(dueNanoseconds: 1_000, entity: key, id: 1, payload: bytes("early")))
            batch.scheduleTimer(JournalTimer(dueNanoseconds: 3_000, entity: key, id: 3))
            batch.recordResult(forKey: bytes("charge-1"), payload: bytes("ok:42"), recordedAt: 1_000)
            _ = try await journal.commit(batch)

            var more = JournalBatch()
            more.deleteHistory(of: key, before: 8)
            more.cancelTimer(dueNanoseconds: 3_000, entity: key, id: 3)
            more.recordResult(forKey: bytes("charge-1"), payload: bytes("second write loses"), recordedAt: 2_000)
            var metadata = EntityMetadata(name: EntityName(type: "Order", id: "o-1"), status: 2, run: 3)
            metadata.status = 2
            more.setMetadata(key, metadata)
            _ = try await journal.commit(more)
            journal.close()
        }
        let journal = try Journal(configuration: configuration)
        defer { journal.close() }
        #expect(try journal.events(of: key).map(\.sequence) == [8, 9, 10])
        #expect(try journal.latestSequence(of: key) == 10)
        #expect(try journal.snapshot(of: key) == JournalSnapshot(sequence: 8, payload: bytes("state@8")))
        #expect(try journal.timers(dueAtOrBefore: 2_500).map(\.id) == [1, 2])
        #expect(try journal.timers().map(\.payload) == [bytes("early"), bytes("late")])
        // From a due time on (a seek, not a scan); a filter's rejects do not count against the limit.
        #expect(try journal.timers(dueAtOrAfter: 1_001).map(\.id) == [2])
        #expect(try journal.timers(dueAtOrAfter: 2_000, dueAtOrBefore: 2_000).map(\.id) == [2])
        #expect(try journal.timers(dueAtOrAfter: 2_001).isEmpty)
        #expect(try journal.timers(limit: 1) { $0.id != 1 }.map(\.id) == [2])
        #expect(try journal.recordedResult(forKey: bytes("charge-1")) == bytes("ok:42"))
        #expect(try journal.recordedResult(forKey: bytes("missing")) == nil)
        let metadata = try #require(try journal.metadata(of: key))
        #expect(metadata.status == 2 && metadata.run == 3 && metadata.prunedBefore == 8)

        // Pruning everything keeps the latest sequence: the next append must still be 11.
        var all = JournalBatch()
        all.deleteHistory(of: key, before: 100)
        _ = try await journal.commit(all)
        #expect(try journal.events(of: key).isEmpty)
        #expect(try journal.latestSequence(of: key) == 10)
        var next = JournalBatch()
        next.append(key, sequence: 11, payload: bytes("e11"))
        _ = try await journal.commit(next)
        #expect(try journal.events(of: key).map(\.sequence) == [11])
    }

    @Test("task rows: inline and long keys are stored, listed in key order by prefix, replaced and deleted; bad key sizes are refused")
    func taskRows() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { journal.close() }
        let inline = ActivityTask.key(entity: 7, activity: 1 << 40)
        #expect(inline.count == 17)
        #expect(inline.bytes == [0x61, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 1, 0, 0, 0, 0, 0])
        #expect(TaskKey(inline.bytes) == inline)
        let long = TaskKey([0x61] + [UInt8](repeating: 0xEE, count: 40))  // held in an array
        let edge = TaskKey([0x61] + [UInt8](repeating: 0x01, count: TaskKey.inlineCapacity - 1))  // the longest inline one
        #expect(long.count == 41 && edge.count == TaskKey.inlineCapacity)
        var batch = JournalBatch()
        batch.putTask(long, value: bytes("long"))
        batch.putTask(inline, value: bytes("first"))
        batch.putTask(key: edge.bytes, value: bytes("edge"))
        batch.putTask(key: [0x6D, 1], value: bytes("other prefix"))
        _ = try await journal.commit(batch)
        #expect(try journal.tasks(prefix: [0x61]).map(\.key) == [inline.bytes, edge.bytes, long.bytes])
        #expect(try journal.task(forKey: long.bytes) == bytes("long"))

        var next = JournalBatch()
        next.putTask(inline, value: bytes("replaced"))
        next.deleteTask(long)
        next.deleteTask(key: edge.bytes)
        next.deleteTask(ActivityTask.key(entity: 99, activity: 99))  // absent: no effect
        _ = try await journal.commit(next)
        #expect(try journal.tasks(prefix: [0x61]).map(\.value) == [bytes("replaced")])
        #expect(try journal.tasks().count == 2)

        for key in [[UInt8](), [UInt8](repeating: 1, count: 512)] {
            var bad = JournalBatch()
            bad.putTask(key: key, value: bytes("x"))
            let error = await #expect(throws: JournalError.self) { try await journal.commit(bad) }
            #expect(error?.code == .nameTooLong)
        }
        #expect(try journal.tasks().count == 2)
    }

    @Test("expectations make a batch a compare-and-set: it commits only if the task rows and timer it expects are as read, after the batches before it; otherwise it alone is refused with conflict and nothing of it is written")
    func expectations() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { journal.close() }
        let entity = try await journal.register(EntityName(type: "Account", id: "a"))
        let task = ActivityTask.key(entity: entity.rawValue, activity: 1)
        let absent = ActivityTask.key(entity: entity.rawValue, activity: 2)
        let timer = JournalTimer(dueNanoseconds: 500, entity: entity, id: 9, payload: bytes("t"))
        var setUp = JournalBatch()
        setUp.putTask(task, value: bytes("v1"))
        setUp.scheduleTimer(timer)
        _ = try await journal.commit(setUp)

        /// A batch that expects `value` in `task`, the timer stored and nothing in `absent`, and writes `write`.
        func conditional(expecting value: [UInt8]?, timerDue: UInt64 = 500, write: String) -> JournalBatch {
            var batch = JournalBatch()
            batch.expectTask(task, value: value)
            batch.expectTask(absent, value: nil)
            batch.expectTimer(dueNanoseconds: timerDue, entity: entity, id: 9)
            batch.putTask(task, value: bytes(write))
            batch.putTask(key: bytes("written-by-\(write)"), value: [1])
            return batch
        }
        // Submitted back to back, committed in order (often in one transaction): the second expects
        // the row the first replaced.
        let (outcomes, outcome) = AsyncStream.makeStream(of: (Int, Result<CommitReceipt, JournalError>).self)
        let batches = [conditional(expecting: bytes("v1"), write: "v2"), conditional(expecting: bytes("v1"), write: "stale"),
                       conditional(expecting: bytes("v2"), write: "v3")]
        for (index, batch) in batches.enumerated() { journal.submit(batch) { outcome.yield((index, $0)) } }
        var results: [Int: Result<CommitReceipt, JournalError>] = [:]
        for await (index, result) in outcomes {
            results[index] = result
            if results.count == batches.count { break }
        }
        #expect(throws: Never.self) { try results[0]?.get() }
        #expect(throws: Never.self) { try results[2]?.get() }
        guard case .failure(let conflict)? = results[1] else { Issue.record("the stale batch committed"); return }
        #expect(conflict.code == .conflict)
        #expect(try journal.task(forKey: task.bytes) == bytes("v3"))
        #expect(try journal.task(forKey: bytes("written-by-stale")) == nil)
        #expect(try journal.task(forKey: bytes("written-by-v2")) == [1] && journal.task(forKey: bytes("written-by-v3")) == [1])

        // Each expectation on its own refuses the batch: a row that should be absent, a timer not stored.
        var present = JournalBatch()
        present.putTask(absent, value: bytes("now here"))
        _ = try await journal.commit(present)
        for batch in [conditional(expecting: bytes("v3"), write: "w1"), {
            var batch = JournalBatch()
            batch.expectTask(task, value: nil)
            batch.putTask(task, value: bytes("w2"))
            return batch
        }()] {
            let error = await #expect(throws: JournalError.self) { try await journal.commit(batch) }
            #expect(error?.code == .conflict)
        }
        var gone = JournalBatch()
        gone.deleteTask(absent)
        gone.cancelTimer(dueNanoseconds: 500, entity: entity, id: 9)
        _ = try await journal.commit(gone)
        let missingTimer = await #expect(throws: JournalError.self) { try await journal.commit(conditional(expecting: bytes("v3"), write: "w3")) }
        #expect(missingTimer?.code == .conflict)
        #expect(try journal.task(forKey: task.bytes) == bytes("v3"))
        #expect(try journal.tasks().map(\.key).filter { $0.starts(with: bytes("written-by-w")) }.isEmpty)
    }

    @Test("a damaged record gives a typed error naming the entity and sequence", arguments: ["history", "log"])
    func corruptedRecord(database: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        // A low threshold: the first events move to history chunks, the last ones wait in the log.
        let configuration = Journal.Configuration(directory: directory.path, coalesceThreshold: 4, logger: quietLogger)
        let key: EntityKey
        let tail: TailRun
        do {
            let journal = try Journal(configuration: configuration)
            key = try await journal.register(EntityName(type: "Account", id: "damaged"))
            for sequence in 1...9 {
                var batch = JournalBatch()
                batch.append(key, sequence: UInt64(sequence), payload: bytes("payload-\(sequence)"))
                _ = try await journal.commit(batch)
            }
            tail = try #require(journal.tails.run(of: key.rawValue))
            journal.close()
        }
        #expect(tail.firstSequence > 1, "some events moved to history")
        // Flip one payload byte behind the journal's back.
        let target = try damage(in: database, tail: tail, directory: directory.path)

        let journal = try Journal(configuration: configuration)
        defer { journal.close() }
        let error = #expect(throws: JournalError.self) { try journal.events(of: key) }
        #expect(error?.code == .corruptedRecord)
        #expect(error?.sequence == target)
        #expect(error?.entity == EntityName(type: "Account", id: "damaged"))
        // The events before the damaged one are still readable.
        #expect(try journal.events(of: key, through: target - 1).count == Int(target - 1))
    }

    @Test("an event missing from the log (or another's record in its place) fails reads of its entity only, at its sequence: its tail still moves and every later commit succeeds",
          arguments: ["missing", "misplaced"])
    func damagedLogRecord(damage: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, coalesceThreshold: 8, logger: quietLogger)
        let damaged = EntityName(type: "Account", id: "damaged")
        let other = EntityName(type: "Account", id: "other")
        let key: EntityKey
        let otherKey: EntityKey
        let position: UInt64
        do {
            let journal = try Journal(configuration: configuration)
            key = try await journal.register(damaged)
            otherKey = try await journal.register(other)
            for sequence in 1...5 {
                var batch = JournalBatch()
                batch.append(key, sequence: UInt64(sequence), payload: bytes("d-\(sequence)"))
                _ = try await journal.commit(batch)
            }
            let tail = try #require(journal.tails.run(of: key.rawValue))
            #expect(tail.firstSequence == 1 && tail.positions.count == 5, "all five wait in the log")
            position = tail.positions[1]  // sequence 2
            journal.close()
        }
        try damageLog(at: position, damage, directory: directory.path)

        func expectDamage(_ journal: Journal, _ context: Comment) throws {
            let error = #expect(throws: JournalError.self, context) { try journal.events(of: key) }
            #expect(error?.code == .corruptedRecord && error?.sequence == 2 && error?.entity == damaged, context)
            #expect(try journal.events(of: key, through: 1).map(\.payload) == [bytes("d-1")], context)
        }
        let journal = try Journal(configuration: configuration)
        #expect(journal.opened.entities == 2 && journal.opened.tailEntities == 1 && journal.opened.damagedTails == 1,
                "the open reports the damaged tail: \(journal.opened)")
        try expectDamage(journal, "in the log")
        // The first commit after the open moves the damaged tail to history, whatever its length;
        // later events fill the tail again past its threshold (8 to 12).
        for sequence in 6...12 {
            var batch = JournalBatch()
            batch.append(key, sequence: UInt64(sequence), payload: bytes("d-\(sequence)"))
            batch.append(otherKey, sequence: UInt64(sequence - 5), payload: bytes("o-\(sequence - 5)"))
            _ = try await journal.commit(batch)
            if sequence == 6 { #expect(journal.tails.run(of: key.rawValue)?.positions.isEmpty ?? true, "the damaged tail moved at once") }
        }
        var later = JournalBatch()
        later.append(otherKey, sequence: 8, payload: bytes("o-8"))
        _ = try await journal.commit(later)
        try expectDamage(journal, "moved to history")
        let error = #expect(throws: JournalError.self) { try journal.events(of: key) }
        #expect(error?.message.contains("when its tail moved to history") == true, "\(String(describing: error?.message))")
        #expect(try journal.events(of: key, from: 3).map(\.payload) == (3...12).map { bytes("d-\($0)") }, "the events after it are intact")
        #expect(try journal.events(of: otherKey).map(\.payload) == (1...8).map { bytes("o-\($0)") })
        journal.close()

        let reopened = try Journal(configuration: configuration)
        defer { reopened.close() }
        #expect(reopened.opened.damagedTails == 0, "the damage moved to history; the log holds nothing more of it")
        #expect(try reopened.latestSequence(of: key) == 12, "no event more for the damaged record: it counts as moved")
        try expectDamage(reopened, "after a reopen")
        #expect(try reopened.events(of: otherKey).count == 8)
    }

    @Test("a log record whose entity field was damaged into another entity's, at that entity's next sequence, is never read as that entity's event: it fails its check, and an intact record of that entity for the sequence takes its place",
          arguments: ["followed", "last"])
    func damagedLogHeader(other: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, coalesceThreshold: 16, logger: quietLogger)
        let first = EntityName(type: "Account", id: "first")
        let second = EntityName(type: "Account", id: "second")
        let key: EntityKey
        let otherKey: EntityKey
        let position: UInt64
        do {
            let journal = try Journal(configuration: configuration)
            key = try await journal.register(first)
            otherKey = try await journal.register(second)
            func append(_ entity: EntityKey, _ sequence: UInt64, _ text: String) async throws {
                var batch = JournalBatch()
                batch.append(entity, sequence: sequence, payload: bytes(text))
                _ = try await journal.commit(batch)
            }
            try await append(key, 1, "f-1")
            try await append(key, 2, "f-2")
            try await append(otherKey, 1, "s-1")
            try await append(otherKey, 2, "s-2")
            try await append(key, 3, "f-3")
            if other == "followed" { try await append(otherKey, 3, "s-3") }
            try await append(key, 4, "f-4")
            try await append(key, 5, "f-5")
            let tail = try #require(journal.tails.run(of: key.rawValue))
            #expect(tail.firstSequence == 1 && tail.positions.count == 5, "all five wait in the log")
            position = tail.positions[2]  // sequence 3
            journal.close()
        }
        // The entity field of `first`'s third event now names `second`, whose next sequence is 3.
        try damageLogEntity(at: position, naming: otherKey, directory: directory.path)

        func expectFirstDamaged(_ journal: Journal, _ context: Comment) throws {
            let error = #expect(throws: JournalError.self, context) { try journal.events(of: key) }
            #expect(error?.code == .corruptedRecord && error?.sequence == 3 && error?.entity == first, context)
            #expect(try journal.events(of: key, through: 2).map(\.payload) == [bytes("f-1"), bytes("f-2")], context)
            #expect(try journal.events(of: key, from: 4).map(\.payload) == [bytes("f-4"), bytes("f-5")], context)
            #expect(try journal.latestSequence(of: key) == 5, context)
        }
        func expectSecond(_ journal: Journal, _ context: Comment) throws {
            if other == "followed" {
                #expect(try journal.events(of: otherKey, through: 3).map(\.payload) == [bytes("s-1"), bytes("s-2"), bytes("s-3")], context)
            } else {
                // Its own two events, then the damaged record, which reads report instead of returning
                // `first`'s payload as `second`'s third event.
                let error = #expect(throws: JournalError.self, context) { try journal.events(of: otherKey, through: 3) }
                #expect(error?.code == .corruptedRecord && error?.sequence == 3 && error?.entity == second, context)
                #expect(try journal.events(of: otherKey, through: 2).map(\.payload) == [bytes("s-1"), bytes("s-2")], context)
            }
        }

        let journal = try Journal(configuration: configuration)
        #expect(journal.opened.damagedTails == 1, "only `first` has a gap: \(journal.opened)")
        #expect(journal.opened.strayRecords == (other == "followed" ? 1 : 0), "\(journal.opened)")
        try expectFirstDamaged(journal, "at the open")
        try expectSecond(journal, "at the open")
        #expect(try journal.latestSequence(of: otherKey) == 3)
        // The first commit moves `first`'s damaged tail and deletes the stray record.
        var batch = JournalBatch()
        batch.append(otherKey, sequence: 4, payload: bytes("s-4"))
        _ = try await journal.commit(batch)
        try expectFirstDamaged(journal, "after the first commit")
        #expect(try journal.events(of: otherKey, from: 4).map(\.payload) == [bytes("s-4")])
        journal.close()

        let reopened = try Journal(configuration: configuration)
        defer { reopened.close() }
        #expect(reopened.opened.damagedTails == 0, "nothing of the damage is left to find: \(reopened.opened)")
        try expectFirstDamaged(reopened, "after a reopen")
        try expectSecond(reopened, "after a reopen")
        #expect(try reopened.latestSequence(of: otherKey) == 4)
    }

    @Test("a log written before checks covered headers is upgraded at open, once, a batch a transaction, going on where an interrupted open stopped; a newer format is refused and left as it was")
    func logFormatUpgrade() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, coalesceThreshold: 16, logger: quietLogger)
        var keys: [EntityKey] = []
        do {
            let journal = try Journal(configuration: configuration)
            for i in 0..<3 { keys.append(try await journal.register(EntityName(type: "Account", id: "u\(i)"))) }
            for sequence in 1...6 {
                var batch = JournalBatch()
                for key in keys { batch.append(key, sequence: UInt64(sequence), payload: bytes("\(key.rawValue):\(sequence)")) }
                _ = try await journal.commit(batch)
            }
            #expect(keys.allSatisfy { journal.tails.run(of: $0.rawValue)?.positions.count == 6 }, "every event waits in the log")
            journal.close()
        }
        func expectIntact(_ journal: Journal, _ context: Comment) throws {
            for key in keys {
                #expect(try journal.events(of: key).map(\.payload) == (1...6).map { bytes("\(key.rawValue):\($0)") }, context)
            }
        }
        func storedFormat() throws -> UInt64? {
            let environment = try Environment.open(.init(directory: directory.path))
            defer { environment.close() }
            let formats = try environment.database("format")
            return try environment.read { txn in
                try JournalLayout.log.formatKey.withUnsafeBytes { k in
                    try txn.withValue(forKey: k, in: formats) { $0.map { $0.bigEndianUInt64(at: 0) } }
                }
            }
        }
        #expect(try storedFormat() == JournalLayout.log.current, "a new directory is written in the current format")
        // Turn the directory into one of format 1: checks of the payload alone, no format row.
        #expect(try downgradeLog(directory: directory.path) == 18)
        #expect(try storedFormat() == nil)
        // An open that stops part-way (a crash): one transaction of five records commits.
        #expect(try upgradePartly(JournalLayout.log, batchSize: 5, batches: 1, directory: directory.path) == false)
        #expect(try storedFormat() == nil, "not upgraded yet: the next open goes on from the sixth record")
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            #expect(journal.opened.damagedTails == 0)
            try expectIntact(journal, "after the upgrade")
            var batch = JournalBatch()
            batch.append(keys[0], sequence: 7, payload: bytes("after"))
            _ = try await journal.commit(batch)
        }
        #expect(try storedFormat() == JournalLayout.log.current)
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            #expect(try journal.events(of: keys[0], from: 7).map(\.payload) == [bytes("after")], "upgraded once: a second open changes nothing")
            try #require(try journal.latestSequence(of: keys[1]) == 6)
        }

        // A format from a newer version: refused, and nothing changes.
        try setLogFormat(JournalLayout.log.current + 1, directory: directory.path)
        let error = #expect(throws: JournalError.self) { try Journal(configuration: configuration) }
        #expect(error?.code == .unsupportedFormat, "\(String(describing: error))")
        #expect(try storedFormat() == JournalLayout.log.current + 1)
    }

    @Test("a snapshot's check covers its entity and sequence: a damaged sequence fails it; a snapshot written before that reads as it was; a sequence of 2^63 or more is refused")
    func snapshotCheck() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, logger: quietLogger)
        let name = EntityName(type: "Account", id: "snapshotted")
        let key: EntityKey
        let older: EntityKey
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            key = try await journal.register(name)
            older = try await journal.register(EntityName(type: "Account", id: "older"))
            var batch = JournalBatch()
            batch.saveSnapshot(key, sequence: 5, payload: bytes("state@5"))
            _ = try await journal.commit(batch)
            #expect(try journal.snapshot(of: key) == JournalSnapshot(sequence: 5, payload: bytes("state@5")))
            var tooLate = JournalBatch()
            tooLate.saveSnapshot(older, sequence: 1 << 63, payload: bytes("x"))
            let error = await #expect(throws: JournalError.self) { try await journal.commit(tooLate) }
            #expect(error?.code == .nonConsecutiveSequence)
            #expect(try journal.snapshot(of: older) == nil, "nothing was written")
        }
        try editTable("snapshots", directory: directory.path) { txn, snapshots in
            // Sequence 5 damaged into 4 (its flag kept); `older` gets a snapshot as written before the flag.
            try Key8(key.rawValue).withBytes { k in
                var value = try #require(try txn.withValue(forKey: k, in: snapshots) { $0.map(Array.init) })
                value[7] ^= 1
                try txn.put(value, forKey: Array(k), in: snapshots)
            }
            let payload = bytes("state@7")
            var value = Key8(7).withBytes { Array($0) }
            withUnsafeBytes(of: CRC32C.checksum(payload).littleEndian) { value.append(contentsOf: $0) }
            value += payload
            try txn.put(value, forKey: Key8(older.rawValue).withBytes { Array($0) }, in: snapshots)
        }
        let journal = try Journal(configuration: configuration)
        defer { journal.close() }
        let error = #expect(throws: JournalError.self) { try journal.snapshot(of: key) }
        #expect(error?.code == .corruptedRecord && error?.entity == name && error?.sequence == 4, "\(String(describing: error))")
        #expect(try journal.snapshot(of: older) == JournalSnapshot(sequence: 7, payload: bytes("state@7")))
        // The entity's next snapshot replaces the damaged one.
        var batch = JournalBatch()
        batch.saveSnapshot(key, sequence: 9, payload: bytes("state@9"))
        _ = try await journal.commit(batch)
        #expect(try journal.snapshot(of: key) == JournalSnapshot(sequence: 9, payload: bytes("state@9")))
    }

    @Test("timers, tasks and results carry checks that cover their keys: a damaged due time, task key or result key, or a damaged payload, fails the check instead of reading as another row")
    func keyedChecks() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, logger: quietLogger)
        let entity: EntityKey
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            entity = try await journal.register(EntityName(type: "Account", id: "checked"))
            var batch = JournalBatch()
            batch.scheduleTimer(JournalTimer(dueNanoseconds: 1_000, entity: entity, id: 1, payload: bytes("early")))
            batch.scheduleTimer(JournalTimer(dueNanoseconds: 2_000, entity: entity, id: 2, payload: bytes("late")))
            batch.scheduleTimer(JournalTimer(dueNanoseconds: 3_000, entity: entity, id: 3))
            for name in ["a-1", "a-2", "a-3"] { batch.putTask(key: bytes(name), value: bytes("task \(name)")) }
            for name in ["k-1", "k-2", "k-3"] { batch.recordResult(forKey: bytes(name), payload: bytes("result \(name)"), recordedAt: 1) }
            _ = try await journal.commit(batch)
            #expect(try journal.timers().allSatisfy(\.isIntact))
            #expect(try journal.tasks().map(\.value) == ["a-1", "a-2", "a-3"].map { bytes("task \($0)") })
            #expect(try journal.tasks().allSatisfy(\.isIntact))
        }
        // Damage, behind the journal's back: a row moved to a key one bit away (its key damaged), or
        // a bit of its payload flipped.
        func move(_ table: String, from old: [UInt8], to new: [UInt8]) throws {
            try editTable(table, directory: directory.path) { txn, database in
                let value = try #require(try txn.value(forKey: old, in: database))
                #expect(try txn.delete(old, in: database))
                try txn.put(value, forKey: new, in: database)
            }
        }
        func flipLastByte(_ table: String, of key: [UInt8]) throws {
            try editTable(table, directory: directory.path) { txn, database in
                var value = try #require(try txn.value(forKey: key, in: database))
                value[value.count - 1] ^= 0x20
                try txn.put(value, forKey: key, in: database)
            }
        }
        let early = Key24(1_000, entity.rawValue, 1).withBytes { Array($0) }
        let earlier = Key24(1_000 ^ 512, entity.rawValue, 1).withBytes { Array($0) }  // due at 488
        try move("timers", from: early, to: earlier)
        try flipLastByte("timers", of: Key24(2_000, entity.rawValue, 2).withBytes { Array($0) })
        try move("tasks", from: bytes("a-1"), to: bytes("a-0"))
        try flipLastByte("tasks", of: bytes("a-2"))
        try move("idempotency", from: bytes("k-1"), to: bytes("k-0"))
        try flipLastByte("idempotency", of: bytes("k-2"))

        let journal = try Journal(configuration: configuration)
        defer { journal.close() }
        let timers = try journal.timers()
        #expect(timers.map(\.dueNanoseconds) == [488, 2_000, 3_000])
        #expect(timers.map(\.isIntact) == [false, false, true], "a moved due time and a damaged payload both fail; the intact timer reads as written")
        #expect(timers.last?.payload == [])
        let tasks = try journal.tasks(prefix: bytes("a-"))
        #expect(tasks.map(\.key) == ["a-0", "a-2", "a-3"].map(bytes))
        #expect(tasks.map(\.isIntact) == [false, false, true])
        #expect(tasks.last?.value == bytes("task a-3"))
        #expect(try journal.task(forKey: bytes("a-3")) == bytes("task a-3"))
        for key in ["a-0", "a-2"] {
            let error = #expect(throws: JournalError.self) { try journal.task(forKey: bytes(key)) }
            #expect(error?.code == .corruptedRecord, "task \(key): \(String(describing: error))")
        }
        #expect(try journal.recordedResult(forKey: bytes("k-3")) == bytes("result k-3"))
        #expect(try journal.recordedResult(forKey: bytes("k-1")) == nil)
        for key in ["k-0", "k-2"] {
            let error = #expect(throws: JournalError.self) { try journal.recordedResult(forKey: bytes(key)) }
            #expect(error?.code == .corruptedRecord, "result \(key): \(String(describing: error))")
        }
    }

    @Test("timers, tasks and results written before their checks covered their keys are upgraded at open, resuming where a killed open stopped; a newer format is refused")
    func keyedCheckUpgrade() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, logger: quietLogger)
        let entity: EntityKey
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            entity = try await journal.register(EntityName(type: "Account", id: "upgraded"))
            var batch = JournalBatch()
            for id in 1...4 {
                batch.scheduleTimer(JournalTimer(dueNanoseconds: 1_000 * UInt64(id), entity: entity, id: UInt64(id), payload: bytes("timer \(id)")))
                batch.putTask(key: bytes("t-\(id)"), value: bytes("task \(id)"))
                batch.recordResult(forKey: bytes("r-\(id)"), payload: bytes("result \(id)"), recordedAt: 1)
            }
            _ = try await journal.commit(batch)
        }
        func expectIntact(_ journal: Journal, _ context: Comment) throws {
            let timers = try journal.timers()
            #expect(timers.allSatisfy(\.isIntact) && timers.map(\.payload) == (1...4).map { bytes("timer \($0)") }, context)
            let tasks = try journal.tasks()
            #expect(tasks.allSatisfy(\.isIntact) && tasks.map(\.value) == (1...4).map { bytes("task \($0)") }, context)
            #expect(try (1...4).map { try journal.recordedResult(forKey: bytes("r-\($0)")) } == (1...4).map { bytes("result \($0)") }, context)
        }
        func storedFormats() throws -> [UInt64?] {
            let rows = try tableRows("format", directory: directory.path)
            return JournalLayout.storedFormats.map { format in
                rows.first { $0.key == format.formatKey }.map { $0.value.withUnsafeBytes { $0.bigEndianUInt64(at: 0) } }
            }
        }
        #expect(try storedFormats() == [2, 2, 2, 3], "a new directory is written in the current formats (timers, tasks, results, log)")

        // Rewrite the directory as the version before keyed checks wrote it: timers and tasks without
        // a check, results with a check of the payload alone, the log's row at 2 and no other.
        for table in ["timers", "tasks"] {
            let rows = try tableRows(table, directory: directory.path)
            try editTable(table, directory: directory.path) { txn, database in
                for row in rows { try txn.put(Array(row.value.dropFirst(4)), forKey: row.key, in: database) }
            }
        }
        let results = try tableRows("idempotency", directory: directory.path)
        try editTable("idempotency", directory: directory.path) { txn, database in
            for row in results {
                var value = row.value
                let check = value.withUnsafeBytes { $0.littleEndianUInt32(at: 0) } ^ CRC32C.checksum(row.key)
                value.withUnsafeMutableBytes { $0.storeLittleEndian(check, at: 0) }
                try txn.put(value, forKey: row.key, in: database)
            }
        }
        try editTable("format", directory: directory.path) { txn, formats in
            let deleted = try [JournalLayout.timers, JournalLayout.tasks, JournalLayout.idempotency].map { try txn.delete($0.formatKey, in: formats) }
            #expect(deleted == [true, true, true])
        }
        try setLogFormat(2, directory: directory.path)
        #expect(try storedFormats() == [nil, nil, nil, 2])
        // An open that stops part-way (a crash): the timers' first transaction, of 3 rows, commits.
        #expect(try upgradePartly(JournalLayout.timers, batchSize: 3, batches: 1, directory: directory.path) == false)
        #expect(try storedFormats() == [nil, nil, nil, 2], "not upgraded yet: the next open goes on from the fourth timer")
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            try expectIntact(journal, "after the upgrade")
        }
        #expect(try storedFormats() == [2, 2, 2, 3])
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            try expectIntact(journal, "upgraded once: a second open changes nothing")
        }

        // A format from a newer version: refused, and nothing changes.
        try editTable("format", directory: directory.path) { txn, formats in
            try txn.put(Key8(3).withBytes { Array($0) }, forKey: JournalLayout.tasks.formatKey, in: formats)
        }
        let error = #expect(throws: JournalError.self) { try Journal(configuration: configuration) }
        #expect(error?.code == .unsupportedFormat, "\(String(describing: error))")
        #expect(try storedFormats() == [2, 3, 2, 3])
    }

    @Test("recorded results expire oldest first, by their first recording's time, at most `limit` a batch; results written before they had times are timed at open")
    func resultsExpire() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, logger: quietLogger)
        func expire(_ journal: Journal, before: UInt64, limit: Int) async throws -> Int {
            var batch = JournalBatch()
            batch.expireResults(recordedBefore: before, limit: limit)
            return try await journal.commit(batch).expiredResults
        }
        func kept(_ journal: Journal) throws -> [String] {
            try ["a", "b", "c", "d"].filter { try journal.recordedResult(forKey: bytes($0)) != nil }
        }
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            var batch = JournalBatch()
            batch.recordResult(forKey: bytes("c"), payload: bytes("3"), recordedAt: 300)
            batch.recordResult(forKey: bytes("a"), payload: bytes("1"), recordedAt: 100)
            batch.recordResult(forKey: bytes("b"), payload: bytes("2"), recordedAt: 200)
            _ = try await journal.commit(batch)
            // A second recording loses, and does not make the key look newer.
            var again = JournalBatch()
            again.recordResult(forKey: bytes("a"), payload: bytes("late"), recordedAt: 900)
            _ = try await journal.commit(again)
            #expect(try journal.recordedResult(forKey: bytes("a")) == bytes("1"))

            #expect(try await expire(journal, before: 100, limit: 10) == 0)  // strictly before
            #expect(try await expire(journal, before: 301, limit: 1) == 1)  // the oldest only
            #expect(try kept(journal) == ["b", "c"])
            #expect(try await expire(journal, before: 250, limit: 10) == 1)
            #expect(try kept(journal) == ["c"])
            #expect(try journal.recordedResult(forKey: bytes("c")) == bytes("3"))
            // An expired key can be recorded afresh, and expires by its new time.
            var fresh = JournalBatch()
            fresh.recordResult(forKey: bytes("a"), payload: bytes("new"), recordedAt: 1_000)
            _ = try await journal.commit(fresh)
            #expect(try journal.recordedResult(forKey: bytes("a")) == bytes("new"))
            #expect(try await expire(journal, before: 1_000, limit: 10) == 1)
            #expect(try kept(journal) == ["a"])
            // A key with no room for its time row is refused whole.
            var long = JournalBatch()
            long.recordResult(forKey: [UInt8](repeating: 7, count: 504), payload: [], recordedAt: 1)
            let error = await #expect(throws: JournalError.self) { try await journal.commit(long) }
            #expect(error?.code == .nameTooLong)
        }
        // A directory from before results had times: drop the time rows by hand.
        do {
            let journal = try Journal(configuration: configuration)
            var batch = JournalBatch()
            batch.recordResult(forKey: bytes("d"), payload: bytes("4"), recordedAt: 50)
            _ = try await journal.commit(batch)
            journal.close()
            try clear("idempotency-times", directory: directory.path)
        }
        let journal = try Journal(configuration: configuration)
        defer { journal.close() }
        #expect(try kept(journal) == ["a", "d"])
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let afterOpen = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
        // Timed at the open (not at 0, not at their old times): kept by any cutoff before it.
        #expect(try await expire(journal, before: afterOpen - 60_000_000_000, limit: 10) == 0)
        #expect(try kept(journal) == ["a", "d"])
        #expect(try await expire(journal, before: afterOpen + 60_000_000_000, limit: 10) == 2)
        #expect(try kept(journal) == [])
    }

    /// Empties one of the journal's databases, as an older version of it would have left it.
    private func clear(_ database: String, directory: String) throws {
        let environment = try Environment.open(.init(directory: directory))
        defer { environment.close() }
        let store = try environment.database(database)
        try environment.write { txn in try txn.clear(store) }
    }

    /// Damages the last payload byte of the tail's first log record, or of the first history chunk
    /// (its last event). Returns the damaged event's sequence.
    private func damage(in database: String, tail: TailRun, directory: String) throws -> UInt64 {
        let environment = try Environment.open(.init(directory: directory))
        defer { environment.close() }
        let store = try environment.database(database)
        return try environment.write { txn in
            try txn.withCursor(store) { cursor in
                let entry: Cursor.Entry?
                let target: UInt64
                if database == "log" {
                    entry = try cursor.seek(atLeast: Key8(tail.positions[0]).withBytes { Array($0) })
                    target = tail.firstSequence
                } else {
                    entry = try cursor.first()
                    let found = try #require(entry)
                    target = try #require(HistoryChunk(firstSequence: found.key.bigEndianUInt64(at: 8), bytes: found.value).lastSequence)
                }
                let current = try #require(entry)
                var value = Array(current.value)
                value[value.count - 1] ^= 0xFF
                let keyBytes = Array(current.key)
                try txn.put(value, forKey: keyBytes, in: store)
                return target
            }
        }
    }

    @Test("map growth under concurrent load loses nothing")
    func mapGrowthUnderLoad() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, initialMapSize: 256 << 10, coalesceThreshold: 8, logger: quietLogger))
        defer { journal.close() }
        var keys: [EntityKey] = []
        for i in 0..<16 { keys.append(try await journal.register(EntityName(type: "Blob", id: "b\(i)"))) }
        let payload = [UInt8](repeating: 0xAB, count: 2_000)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for key in keys {
                group.addTask {
                    for sequence in 1...150 {
                        var batch = JournalBatch()
                        batch.append(key, sequence: UInt64(sequence), payload: payload + bytes("\(sequence)"))
                        _ = try await journal.commit(batch)
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(journal.environment.mapGrowthCount > 0)
        for key in keys {
            let events = try journal.events(of: key)
            #expect(events.map(\.sequence) == Array(1...150))
            #expect(events.allSatisfy { $0.payload == payload + bytes("\($0.sequence)") })
        }
    }

    @Test("a failed commit fails every caller in it and leaves nothing visible")
    func failedCommitFailsAll() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        // The map may not grow past 1 MiB; a batch larger than that cannot commit.
        let journal = try Journal(configuration: .init(directory: directory.path, initialMapSize: 1 << 20, maxMapSize: 1 << 20, logger: quietLogger))
        defer { journal.close() }
        let key = try await journal.register(EntityName(type: "Blob", id: "big"))
        let other = try await journal.register(EntityName(type: "Blob", id: "small"))
        var huge = JournalBatch()
        huge.append(key, sequence: 1, payload: [UInt8](repeating: 1, count: 2 << 20))
        var small = JournalBatch()
        small.append(other, sequence: 1, payload: bytes("tiny"))
        async let a = Result { try await journal.commit(huge) }
        async let b = Result { try await journal.commit(small) }
        let results = await [a, b]
        // The huge batch always fails; the small one fails too when it shared the transaction.
        guard case .failure(let error as JournalError) = results[0] else {
            Issue.record("the oversized commit succeeded")
            return
        }
        #expect(error.code == .storage)
        #expect(try journal.latestSequence(of: key) == 0)
        if case .failure = results[1] { #expect(try journal.latestSequence(of: other) == 0) }
        // The journal still works afterwards.
        var after = JournalBatch()
        after.append(key, sequence: 1, payload: bytes("fits"))
        _ = try await journal.commit(after)
        #expect(try journal.events(of: key).map(\.payload) == [bytes("fits")])
    }

    @Test("a second journal on an open directory gets a clear error, never a second writer")
    func secondOpenerIsRefused() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        let error = #expect(throws: JournalError.self) { try Journal(configuration: .init(directory: directory.path, logger: quietLogger)) }
        #expect(error?.code == .alreadyOpen)
        // The first one is unharmed.
        let key = try await journal.register(EntityName(type: "A", id: "1"))
        var batch = JournalBatch()
        batch.append(key, sequence: 1, payload: bytes("x"))
        _ = try await journal.commit(batch)
        journal.close()
        // Once closed, the directory opens again.
        let again = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        #expect(try again.latestSequence(of: key) == 1)
        again.close()
    }

    @Test("commits after close fail with a typed error")
    func commitAfterClose() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        let key = try await journal.register(EntityName(type: "A", id: "1"))
        journal.close()
        var batch = JournalBatch()
        batch.append(key, sequence: 1, payload: [])
        let error = await #expect(throws: JournalError.self) { try await journal.commit(batch) }
        #expect(error?.code == .closed)
    }

    @Test("closing the journal from a commit's completion does not wait for itself; the commit is durable")
    func closeFromCompletion() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, logger: quietLogger)
        let journal = try Journal(configuration: configuration)
        let key = try await journal.register(EntityName(type: "A", id: "1"))
        var batch = JournalBatch()
        batch.append(key, sequence: 1, payload: bytes("last"))
        let committed = await withCheckedContinuation { (done: CheckedContinuation<Bool, Never>) in
            journal.submit(batch) { result in
                journal.close()
                done.resume(returning: (try? result.get()) != nil)
            }
        }
        #expect(committed)
        let reopened = try Journal(configuration: configuration)
        defer { reopened.close() }
        #expect(try reopened.events(of: key).map(\.payload) == [bytes("last")])
    }

    @Test("a reserved key lets one batch register an entity and append to it; conflicts are refused")
    func registerWithReservedKey() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let journal = try Journal(configuration: .init(directory: directory.path, logger: quietLogger))
        defer { journal.close() }
        let name = EntityName(type: "Cart", id: "c-1")
        let reserved = try journal.reserveKey(for: name)
        #expect(!reserved.registered)
        var batch = JournalBatch()
        batch.register(name, as: reserved.key)
        batch.append(reserved.key, sequence: 1, payload: bytes("first"))
        _ = try await journal.commit(batch)
        #expect(try journal.key(for: name) == reserved.key)
        #expect(try journal.events(of: reserved.key).map(\.payload) == [bytes("first")])
        #expect(try journal.reserveKey(for: name) == (reserved.key, true))

        // The same name under another key, or another name under a taken key, is refused.
        let other = try journal.reserveKey(for: EntityName(type: "Cart", id: "c-2")).key
        var conflicting = JournalBatch()
        conflicting.register(name, as: other)
        await #expect(throws: JournalError.self) { try await journal.commit(conflicting) }
        var stealing = JournalBatch()
        stealing.register(EntityName(type: "Cart", id: "c-3"), as: reserved.key)
        await #expect(throws: JournalError.self) { try await journal.commit(stealing) }
        #expect(try journal.key(for: EntityName(type: "Cart", id: "c-3")) == nil)

        // Within one batch too: two names under one key, one name under two keys (or under a reserved
        // key and one the commit would allocate) are refused, and nothing of the batch is written.
        let (n4, n5) = (EntityName(type: "Cart", id: "c-4"), EntityName(type: "Cart", id: "c-5"))
        let (k4, k5) = (try journal.reserveKey(for: n4).key, try journal.reserveKey(for: n5).key)
        var twoNames = JournalBatch()
        twoNames.register(n4, as: k4)
        twoNames.register(n5, as: k4)
        var twoKeys = JournalBatch()
        twoKeys.register(n4, as: k4)
        twoKeys.register(n4, as: k5)
        var allocatedAndReserved = JournalBatch()
        allocatedAndReserved.register(n4)
        allocatedAndReserved.register(n4, as: k4)
        for batch in [twoNames, twoKeys, allocatedAndReserved] {
            var refused: JournalError?
            do { _ = try await journal.commit(batch) } catch { refused = error }
            #expect(refused?.code == .unknownEntity, "\(String(describing: refused))")
            #expect(try journal.key(for: n4) == nil && journal.key(for: n5) == nil)
        }
        #expect(try journal.metadata(of: k4) == nil)
        // The same registration twice, or a name's own key confirmed, is fine.
        var twice = JournalBatch()
        twice.register(n4, as: k4)
        twice.register(n4, as: k4)
        twice.register(name)
        twice.register(name, as: reserved.key)
        #expect(try await journal.commit(twice).registered == [k4, k4, reserved.key, reserved.key])
        #expect(try journal.key(for: n4) == k4)
    }

    @Test("events built in one buffer: a failed write leaves it as it was; an oversized event refuses the whole run; runs and single appends mix")
    func eventRuns() async throws {
        struct Refused: Error {}
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = Journal.Configuration(directory: directory.path, logger: quietLogger)
        configuration.maxPayloadBytes = 64
        let journal = try Journal(configuration: configuration)
        defer { journal.close() }
        let key = try await journal.register(EntityName(type: "Order", id: "o-9"))

        var events = JournalEvents(firstSequence: 1)
        events.append(bytes("one"))
        #expect(events.append { $0.append(contentsOf: bytes("two")) } == 3)
        #expect(throws: Refused.self) { try events.append { $0.append(contentsOf: bytes("half-written")); throw Refused() } }
        #expect(events.count == 2 && events.nextSequence == 3 && events.byteCount == 4 + 2 * (JournalEvents.overhead + 3))
        var batch = JournalBatch()
        batch.append(key, events: events)
        batch.append(key, sequence: 3, payload: bytes("three"))  // joins the run above
        #expect(batch.operations.count == 1)
        _ = try await journal.commit(batch)
        #expect(try journal.events(of: key).map(\.payload) == ["one", "two", "three"].map(bytes))

        var oversized = JournalEvents(firstSequence: 4)
        oversized.append(bytes("four"))
        oversized.append([UInt8](repeating: 7, count: 65))
        var refused = JournalBatch()
        refused.append(key, events: oversized)
        let error = await #expect(throws: JournalError.self) { try await journal.commit(refused) }
        #expect(error?.code == .payloadTooLarge && error?.sequence == 5)
        #expect(try journal.latestSequence(of: key) == 3)
    }

    @Test("a new entity's first events go straight to its history range; later ones wait in the log; reads merge both, across reopen")
    func newEntityHistory() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, logger: quietLogger)
        let (a, b) = (EntityName(type: "Order", id: "o-1"), EntityName(type: "Order", id: "o-2"))
        // Payloads of 100 bytes: 50 events need three ~2 KB chunks.
        func payload(_ key: EntityKey, _ sequence: UInt64) -> [UInt8] {
            Array("\(key.rawValue):\(sequence):".utf8) + Array(repeating: UInt8(sequence & 0x7F), count: 90)
        }
        func check(_ journal: Journal, _ key: EntityKey, latest: UInt64) throws {
            #expect(try journal.latestSequence(of: key) == latest)
            let events = try journal.events(of: key)
            #expect(events.map(\.sequence) == Array(1...latest))
            #expect(events.allSatisfy { $0.payload == payload(key, $0.sequence) })
        }
        func counts(_ journal: Journal) throws -> (log: Int, history: Int) {
            try journal.environment.read { txn in (try txn.count(journal.stores.log), try txn.count(journal.stores.history)) }
        }
        let keyA: EntityKey, keyB: EntityKey
        do {
            let journal = try Journal(configuration: configuration)
            keyA = try journal.reserveKey(for: a).key
            keyB = try journal.reserveKey(for: b).key
            // One batch: `a` registered with 50 events, `b` registered with events interleaved with a
            // third, older entity's append (which goes to the log).
            let old = try await journal.register(EntityName(type: "Order", id: "o-0"))
            var batch = JournalBatch()
            batch.register(a, as: keyA)
            for sequence in 1...50 { batch.append(keyA, sequence: UInt64(sequence), payload: payload(keyA, UInt64(sequence))) }
            batch.register(b, as: keyB)
            batch.append(keyB, sequence: 1, payload: payload(keyB, 1))
            batch.append(old, sequence: 1, payload: payload(old, 1))
            batch.append(keyB, sequence: 2, payload: payload(keyB, 2))
            _ = try await journal.commit(batch)
            #expect(journal.tails.run(of: keyA.rawValue) == nil && journal.tails.run(of: keyB.rawValue) == nil)
            #expect(journal.tails.run(of: old.rawValue)?.positions.count == 1)
            // a: 3 chunks; b: 2 (one an append, split by the other entity's append).
            #expect(try counts(journal) == (log: 1, history: 5))
            try check(journal, keyA, latest: 50)
            try check(journal, keyB, latest: 2)

            // Later appends to a known entity wait in the log, after its history.
            var later = JournalBatch()
            for sequence in 51...53 { later.append(keyA, sequence: UInt64(sequence), payload: payload(keyA, UInt64(sequence))) }
            _ = try await journal.commit(later)
            #expect(journal.tails.run(of: keyA.rawValue)?.firstSequence == 51)
            #expect(try counts(journal) == (log: 4, history: 5))
            // A gap after the history is still refused (against the latest sequence the writer kept
            // from the commit that wrote `b`'s history) ...
            var gap = JournalBatch()
            gap.append(keyB, sequence: 4, payload: payload(keyB, 4))
            await #expect(throws: JournalError.self) { try await journal.commit(gap) }
            try check(journal, keyA, latest: 53)
            try check(journal, keyB, latest: 2)
            // ... and the next batch appends after it.
            var next = JournalBatch()
            next.append(keyB, sequence: 3, payload: payload(keyB, 3))
            _ = try await journal.commit(next)
            try check(journal, keyB, latest: 3)
            journal.close()
        }
        let reopened = try Journal(configuration: configuration)
        defer { reopened.close() }
        #expect(reopened.tails.run(of: keyA.rawValue)?.firstSequence == 51)
        #expect(reopened.tails.run(of: keyB.rawValue)?.firstSequence == 3)
        try check(reopened, keyA, latest: 53)
        try check(reopened, keyB, latest: 3)
        var next = JournalBatch()
        next.append(keyB, sequence: 4, payload: payload(keyB, 4))
        _ = try await reopened.commit(next)
        try check(reopened, keyB, latest: 4)
    }
}

extension Result where Failure == any Error {
    init(catching body: () async throws -> Success) async {
        do { self = .success(try await body()) } catch { self = .failure(error) }
    }
}

@Suite("Journal recent records")
struct RecentRecordsTests {
    @Test("new names wait in an append-only table and merge into the names index in key order; every acknowledged name is found throughout, by a concurrent reader and across reopen")
    func deferredNames() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let configuration = Journal.Configuration(directory: directory.path, deferredNameLimit: 8, logger: quietLogger)
        let acknowledged = Mutex<[EntityName: EntityKey]>([:])
        /// Rows in `names` and in `pending-names` (the watermark row not counted).
        func tables(_ journal: Journal) throws -> (indexed: [EntityName: EntityKey], rows: Int) {
            try journal.environment.read { txn in
                var indexed: [EntityName: EntityKey] = [:]
                try txn.withCursor(journal.stores.names) { cursor in
                    var entry = try cursor.first()
                    while let current = entry {
                        let name = try #require(EntityName(nameKey: current.key))
                        indexed[name] = EntityKey(rawValue: current.value.bigEndianUInt64(at: 0))
                        entry = try cursor.next()
                    }
                }
                var rows = 0
                try txn.withCursor(journal.stores.pendingNames) { cursor in
                    var entry = try cursor.first()
                    while let current = entry {
                        if current.key.bigEndianUInt64(at: 0) != 0 { rows += 1 }
                        entry = try cursor.next()
                    }
                }
                return (indexed, rows)
            }
        }
        /// Commits small appends until the merges have caught up: fewer names wait than the limit,
        /// the rest are in `names`, and no merged row is left in `pending-names`.
        func settle(_ journal: Journal, _ key: EntityKey) async throws {
            var sequence = try journal.latestSequence(of: key)
            for _ in 0..<5_000 {
                let (indexed, rows) = try tables(journal)
                let waiting = journal.pending.count
                if waiting < 8, rows == waiting, indexed.count + waiting == acknowledged.withLock({ $0.count }) { return }
                sequence += 1
                var batch = JournalBatch()
                batch.append(key, sequence: sequence, payload: bytes("tick"))
                _ = try await journal.commit(batch)
            }
            Issue.record("the name merges did not catch up")
        }

        let ids = (0..<90).map { "order-\($0 * 7919 % 1000)" }  // no order a B-tree would like
        do {
            let journal = try Journal(configuration: configuration)
            // A reader that looks up every acknowledged name, again and again, while names register and merge.
            let stop = Atomic<Bool>(false)
            let misses = Atomic<Int>(0)
            let finished = DispatchSemaphore(value: 0)
            let reader = Thread {
                while !stop.load(ordering: .acquiring) {
                    for (name, key) in acknowledged.withLock({ $0 }) where (try? journal.key(for: name)) != key {
                        misses.add(1, ordering: .relaxed)
                    }
                }
                finished.signal()
            }
            reader.start()
            for (index, id) in ids[..<60].enumerated() {
                let name = EntityName(type: "Order", id: id)
                let key = try await journal.register(name, reservingKeyWithFirstEvent: index % 3 == 0 ? nil : bytes(id))
                acknowledged.withLock { $0[name] = key }
                #expect(try journal.key(for: name) == key)
            }
            let ticker = try await journal.register(EntityName(type: "Clock", id: "ticks"))
            acknowledged.withLock { $0[EntityName(type: "Clock", id: "ticks")] = ticker }
            try await settle(journal, ticker)
            stop.store(true, ordering: .releasing)
            await withCheckedContinuation { done in DispatchQueue.global().async { finished.wait(); done.resume() } }
            #expect(misses.load(ordering: .relaxed) == 0, "a concurrent lookup missed an acknowledged name")

            let (indexed, rows) = try tables(journal)
            #expect(indexed.count >= 61 - 7 && rows == journal.pending.count)
            for (name, key) in acknowledged.withLock({ $0 }) {
                // In exactly one place: the index, or waiting.
                #expect((indexed[name] == key) != (journal.pending.key(for: name) == key), "\(name)")
            }
            // A name registers once, waiting or merged; the same name under another key is refused.
            let merged = try #require(indexed.first?.key)
            #expect(try await journal.register(merged) == acknowledged.withLock { $0[merged] })
            var conflicting = JournalBatch()
            conflicting.register(merged, as: journal.reserveNewKey())
            await #expect(throws: JournalError.self) { try await journal.commit(conflicting) }
            let name = EntityName(type: "Order", id: "waiting")
            let key = try await journal.register(name)
            acknowledged.withLock { $0[name] = key }
            #expect(journal.pending.key(for: name) == key)
            var again = JournalBatch()
            again.register(name, as: journal.reserveNewKey())
            await #expect(throws: JournalError.self) { try await journal.commit(again) }
            journal.close()
        }
        // Reopen: the waiting names come back from their table; registering and merging go on.
        do {
            let journal = try Journal(configuration: configuration)
            defer { journal.close() }
            for (name, key) in acknowledged.withLock({ $0 }) { #expect(try journal.key(for: name) == key, "\(name)") }
            #expect(try tables(journal).rows == journal.pending.count)
            for id in ids[60...] {
                let name = EntityName(type: "Order", id: id)
                let key = try await journal.register(name)
                acknowledged.withLock { $0[name] = key }
            }
            try await settle(journal, try #require(try journal.key(for: EntityName(type: "Clock", id: "ticks"))))
            let all = acknowledged.withLock { $0 }
            #expect(Set(all.values).count == all.count, "two names share a key")
            for (name, key) in all { #expect(try journal.key(for: name) == key, "\(name)") }
            #expect(try tables(journal).indexed.count + journal.pending.count == all.count)
        }
    }

    @Test("recent records: found while kept, gone once the ring wrote over them or another position took the slot; a re-append replaces an aborted one, a too-large re-append clears it")
    func recentRecords() throws {
        let recent = RecentRecords(capacity: 1_024)  // 16 slots, records up to 64 bytes
        func lookup(_ position: UInt64) -> [UInt8]? {
            var found: [UInt8]?
            _ = recent.withRecord(position: position) { found = Array($0) }
            return found
        }
        func record(_ checksum: UInt32, _ payload: [UInt8]) -> [UInt8] {
            withUnsafeBytes(of: checksum.littleEndian) { Array($0) } + payload
        }
        recent.record(position: 0, checksum: 7, payload: bytes("zero"))
        recent.record(position: 1, checksum: 8, payload: bytes("one"))
        #expect(lookup(0) == record(7, bytes("zero")))
        #expect(lookup(1) == record(8, bytes("one")))
        #expect(lookup(2) == nil)
        // Position 17 takes position 1's slot.
        recent.record(position: 17, checksum: 9, payload: bytes("seventeen"))
        #expect(lookup(1) == nil)
        #expect(lookup(17) == record(9, bytes("seventeen")))
        // An aborted transaction's record is replaced when the position is appended again.
        recent.record(position: 2, checksum: 1, payload: bytes("aborted"))
        recent.record(position: 2, checksum: 2, payload: bytes("committed"))
        #expect(lookup(2) == record(2, bytes("committed")))
        // Too large for the ring (over a sixteenth of it): not kept.
        recent.record(position: 3, checksum: 3, payload: [UInt8](repeating: 1, count: 100))
        #expect(lookup(3) == nil)
        // An aborted transaction's small record, then a too-large one at the same position: the slot
        // forgets the aborted record (the lookup must read the log, never return another event).
        recent.record(position: 5, checksum: 5, payload: bytes("aborted"))
        recent.record(position: 5, checksum: 6, payload: [UInt8](repeating: 2, count: 100))
        #expect(lookup(5) == nil)
        // Enough bytes later, the ring has written over position 0's bytes although its slot is intact.
        for position in UInt64(4)..<UInt64(16) { recent.record(position: position, checksum: 0, payload: [UInt8](repeating: UInt8(position), count: 60)) }
        for position in UInt64(20)..<UInt64(32) { recent.record(position: position, checksum: 0, payload: [UInt8](repeating: UInt8(position), count: 60)) }
        #expect(lookup(0) == nil)
        #expect(lookup(31) == record(0, [UInt8](repeating: 31, count: 60)))
        // Disabled: nothing is kept.
        let off = RecentRecords(capacity: 0)
        off.record(position: 0, checksum: 0, payload: bytes("x"))
        #expect(!off.withRecord(position: 0) { _ in })
    }

    @Test("fresh histories: an entry is taken once; the oldest are dropped beyond the capacity")
    func freshHistories() {
        let fresh = FreshHistories(capacity: 3)
        #expect(fresh.take(1) == nil)
        fresh.add(1, latest: 10)
        fresh.add(2, latest: 20)
        #expect(fresh.take(1) == 10)
        #expect(fresh.take(1) == nil, "taken once: the entity has a tail from then on")
        fresh.add(3, latest: 30)
        fresh.add(4, latest: 40)  // capacity 3: 1 (taken already) leaves the order
        #expect(fresh.count == 3)
        fresh.add(5, latest: 50)  // drops 2, the oldest kept
        #expect(fresh.take(2) == nil)
        #expect([fresh.take(3), fresh.take(4), fresh.take(5)] == [30, 40, 50])
        #expect(fresh.count == 0)
    }

    @Test("a tail's appended positions: a consecutive run held inline, gaps after it, drops across both, in order")
    func appendedPositions() {
        var positions = AppendedPositions()
        #expect(positions.isEmpty && positions.first == nil && positions.array() == [])
        for position: UInt64 in [10, 11, 12] { positions.append(position) }
        #expect(positions.count == 3 && positions.first == 10 && positions.array() == [10, 11, 12])
        // Another batch's events came in between: the rest keeps its order after the run.
        for position: UInt64 in [20, 21, 13] { positions.append(position) }
        #expect(positions.array() == [10, 11, 12, 20, 21, 13])
        positions.removeFirst(2)
        #expect(positions.first == 12 && positions.array() == [12, 20, 21, 13])
        positions.removeFirst(2)  // the rest of the run and one after it
        #expect(positions.first == 21 && positions.array() == [21, 13])
        positions.append(14)  // after a gap, never into the emptied run
        #expect(positions.array() == [21, 13, 14])
        positions.removeFirst(3)
        #expect(positions.isEmpty)
        positions.append(30)
        positions.append(31)
        var published: [UInt64] = [1, 2]
        positions.append(to: &published)
        #expect(published == [1, 2, 30, 31])
        #expect(positions.array(minimumCapacity: 8).capacity >= 8)
    }

    @Test("the entity table keeps a page only while it holds a value: values in and out across pages, counts, order, reuse of a freed page")
    func entityTablePagesFollowValues() {
        var table = EntityTable<Int>()
        let pageSize: UInt64 = 4_096
        // A value in each of the first 100 pages, and two in page 3.
        for page in 0..<UInt64(100) { table[page * pageSize + 1] = Int(page) }
        table[3 * pageSize + 7] = 307
        #expect(table.count == 101 && table.allocatedPages == 100)
        #expect(table[5 * pageSize + 1] == 5 && table[5 * pageSize + 2] == nil && table[200 * pageSize] == nil)
        // Emptying a page frees it; a page with a value left keeps it.
        for page in 0..<UInt64(100) { table[page * pageSize + 1] = nil }
        #expect(table.count == 1 && table.allocatedPages == 1)
        #expect(table[3 * pageSize + 7] == 307 && table[3 * pageSize + 1] == nil)
        // Removing what is not there changes nothing, in a freed page or past the end.
        table[5 * pageSize + 1] = nil
        table[1_000 * pageSize] = nil
        #expect(table.count == 1 && table.allocatedPages == 1)
        // A freed page comes back on its next value; in-place changes and key-order iteration still work.
        table[5 * pageSize + 9] = 509
        table.modify(5 * pageSize + 9) { $0 += 1 }
        table.modify(6 * pageSize) { $0 += 1 }  // absent: nothing happens
        var seen: [(UInt64, Int)] = []
        table.forEach { seen.append(($0, $1)) }
        #expect(seen.map(\.0) == [3 * pageSize + 7, 5 * pageSize + 9] && seen.map(\.1) == [307, 510])
        #expect(table.read(5 * pageSize + 9) { $0 } == 510 && table.count == 2 && table.allocatedPages == 2)
        table[3 * pageSize + 7] = nil
        table[5 * pageSize + 9] = nil
        #expect(table.count == 0 && table.allocatedPages == 0)
    }
}

extension RecentRecords {
    /// Keeps the record of `position` from its checksum and payload.
    func record(position: UInt64, checksum: UInt32, payload: [UInt8]) {
        var record = withUnsafeBytes(of: checksum.littleEndian) { Array($0) }
        record += payload
        record.withUnsafeBytes { self.record(position: position, record: $0) }
    }
}

/// Deletes the log record at `position` ("missing"), or makes it claim another sequence ("misplaced").
func damageLog(at position: UInt64, _ damage: String, directory: String) throws {
    let environment = try Environment.open(.init(directory: directory))
    defer { environment.close() }
    let log = try environment.database("log")
    try environment.write { txn in
        let key = Key8(position).withBytes { Array($0) }
        if damage == "missing" {
            #expect(try txn.delete(key, in: log))
        } else {
            var value = try #require(try key.withUnsafeBytes { k in try txn.withValue(forKey: k, in: log) { $0.map(Array.init) } })
            value.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(99).bigEndian, toByteOffset: 8, as: UInt64.self) }
            try txn.put(value, forKey: key, in: log)
        }
    }
}

/// Writes `entity` into the entity field of the log record at `position`, as damage would.
func damageLogEntity(at position: UInt64, naming entity: EntityKey, directory: String) throws {
    let environment = try Environment.open(.init(directory: directory))
    defer { environment.close() }
    let log = try environment.database("log")
    try environment.write { txn in
        let key = Key8(position).withBytes { Array($0) }
        var value = try #require(try key.withUnsafeBytes { k in try txn.withValue(forKey: k, in: log) { $0.map(Array.init) } })
        value.withUnsafeMutableBytes { $0.storeBytes(of: entity.rawValue.bigEndian, toByteOffset: 0, as: UInt64.self) }
        try txn.put(value, forKey: key, in: log)
    }
}

/// Rewrites the directory as format 1 wrote it: log checks of the payload alone, no `format` row.
/// Returns how many log records it rewrote.
func downgradeLog(directory: String) throws -> Int {
    let environment = try Environment.open(.init(directory: directory))
    defer { environment.close() }
    let log = try environment.database("log")
    let formats = try environment.database("format")
    return try environment.write { txn in
        var rows: [(key: [UInt8], value: [UInt8])] = []
        try txn.withCursor(log) { cursor in
            var entry = try cursor.first()
            while let current = entry {
                rows.append((Array(current.key), Array(current.value)))
                entry = try cursor.next()
            }
        }
        for var row in rows {
            row.value.withUnsafeMutableBytes { $0.storeLittleEndian(JournalLayout.flippedCheck(ofLogRecord: UnsafeRawBufferPointer($0)), at: 16) }
            try txn.put(row.value, forKey: row.key, in: log)
        }
        _ = try txn.delete(JournalLayout.log.formatKey, in: formats)
        return rows.count
    }
}

/// Writes `format` as the log's format row.
func setLogFormat(_ format: UInt64, directory: String) throws {
    let environment = try Environment.open(.init(directory: directory))
    defer { environment.close() }
    let formats = try environment.database("format")
    try environment.write { txn in
        try txn.put(Key8(format).withBytes { Array($0) }, forKey: JournalLayout.log.formatKey, in: formats)
    }
}

/// Runs at most `batches` transactions of `format`'s upgrade, as an open that crashes after them
/// would. Returns whether the upgrade finished.
func upgradePartly(_ format: JournalLayout.StoredFormat, batchSize: Int, batches: Int, directory: String) throws -> Bool {
    let environment = try Environment.open(.init(directory: directory))
    defer { environment.close() }
    return try Journal.upgrade([format], environment: environment, logger: quietLogger, batchSize: batchSize, batches: batches)
}

/// Edits the journal's table `table` behind its back.
func editTable(_ table: String, directory: String, _ body: (borrowing WriteTransaction, Database) throws -> Void) throws {
    let environment = try Environment.open(.init(directory: directory))
    defer { environment.close() }
    let database = try environment.database(table)
    try environment.write { txn in try body(txn, database) }
}

/// The rows of the journal's table `table`, in key order.
func tableRows(_ table: String, directory: String) throws -> [(key: [UInt8], value: [UInt8])] {
    let environment = try Environment.open(.init(directory: directory))
    defer { environment.close() }
    let database = try environment.database(table)
    return try environment.read { txn in
        try txn.withCursor(database) { cursor in
            var rows: [(key: [UInt8], value: [UInt8])] = []
            var entry = try cursor.first()
            while let current = entry {
                rows.append((Array(current.key), Array(current.value)))
                entry = try cursor.next()
            }
            return rows
        }
    }
}
