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
}
