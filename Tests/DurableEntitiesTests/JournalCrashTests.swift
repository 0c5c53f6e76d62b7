@testable import DurableEntities
import Foundation
import TestSupport
import Testing

@Suite("Journal crash safety")
struct JournalCrashTests {
    @Test("a writer SIGKILLed mid-stream leaves every acknowledged append and no partial batch")
    func sigkillMidStream() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let entities = 40
        let eventsPerBatch = 3
        var acknowledged: [UInt64: UInt64] = [:]
        for round in 1...3 {
            let child = try ChildProcess("JournalCrashChild", arguments: ["append", directory.path, "\(entities)", "\(eventsPerBatch)"])
            var acks = 0
            let killAfter = Int.random(in: 300...4_000)
            func record(_ line: String) {
                let parts = line.split(separator: " ")
                guard parts.count == 3, parts[0] == "ack", let key = UInt64(parts[1]), let sequence = UInt64(parts[2]) else { return }
                acknowledged[key] = max(acknowledged[key] ?? 0, sequence)
                acks += 1
            }
            while acks < killAfter, let line = await child.readLine() { record(line) }
            child.kill()
            for line in await child.remainingLines() { record(line) }
            #expect(acks >= killAfter, "round \(round): the child stopped early")

            let journal = try Journal(configuration: .init(directory: directory.path, coalesceThreshold: 8, logWindow: 512, logger: quietLogger))
            defer { journal.close() }
            // The kill left no torn row: every row of every table passes its checks.
            let verification = try journal.verify()
            #expect(verification.isIntact, "round \(round): \(verification)")
            #expect(verification.rows > 0)
            for index in 0..<entities {
                let key = try #require(try journal.key(for: EntityName(type: "Account", id: "acc-\(index)")))
                let latest = try journal.latestSequence(of: key)
                #expect(latest >= acknowledged[key.rawValue] ?? 0, "round \(round): entity \(index) lost acknowledged events")
                #expect(latest % UInt64(eventsPerBatch) == 0, "round \(round): entity \(index) has a partial batch (latest \(latest))")
                let events = try journal.events(of: key)
                #expect(events.map(\.sequence) == (latest == 0 ? [] : Array(1...latest)))
                for event in events { #expect(event.payload == bytes("\(key.rawValue):\(event.sequence)")) }
                if let snapshot = try journal.snapshot(of: key) {
                    #expect(snapshot.payload == bytes("snap:\(snapshot.sequence)") && snapshot.sequence <= latest)
                }
            }
        }
        #expect(acknowledged.count == entities)
    }

    @Test("a writer SIGKILLed while names register and merge into the index: every acknowledged name keeps its key, and merging goes on after reopen")
    func sigkillWhileNamesMerge() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var acknowledged: [String: UInt64] = [:]
        for round in 1...3 {
            let child = try ChildProcess("JournalCrashChild", arguments: ["register", directory.path])
            var acks = 0
            let killAfter = Int.random(in: 200...2_000)
            func record(_ line: String) {
                let parts = line.split(separator: " ")
                guard parts.count == 3, parts[0] == "name", let key = UInt64(parts[2]) else { return }
                #expect(acknowledged.updateValue(key, forKey: String(parts[1])) == nil, "round \(round): \(parts[1]) acknowledged twice")
                acks += 1
            }
            while acks < killAfter, let line = await child.readLine() { record(line) }
            child.kill()
            for line in await child.remainingLines() { record(line) }
            #expect(acks >= killAfter, "round \(round): the child stopped early")

            let journal = try Journal(configuration: .init(directory: directory.path, deferredNameLimit: 16, logger: quietLogger))
            defer { journal.close() }
            #expect(Set(acknowledged.values).count == acknowledged.count, "round \(round): two names share a key")
            for (id, key) in acknowledged {
                let name = EntityName(type: "Order", id: id)
                #expect(try journal.key(for: name)?.rawValue == key, "round \(round): \(id) lost its key")
                #expect(try journal.metadata(of: EntityKey(rawValue: key))?.name == name)
                // Registering again is idempotent, waiting or merged.
                #expect(try await journal.register(name).rawValue == key)
            }
        }
        #expect(acknowledged.count >= 600)
    }
}
