// A child process for crash tests. The tests start it, read what it acknowledges on stdout, kill it
// with SIGKILL at a random moment, and check the directory it leaves behind.
//
//   JournalCrashChild append DIR ENTITIES EVENTS_PER_BATCH
//       Registers ENTITIES accounts and appends batches of EVENTS_PER_BATCH events to them from
//       concurrent tasks, forever. After each durable commit prints `ack <entity-key> <last-sequence>`.
//       Event payloads are "<entity-key>:<sequence>", so the checker can verify content.
//   JournalCrashChild register DIR
//       Registers entities `Order/o-<worker>-<n>` from concurrent tasks, forever, half with a reserved
//       key and a first event in the same batch, with a deferred name limit of 16 (so a kill can hit
//       a merge into the names index or the deletion of merged rows). After each durable commit
//       prints `name <id> <entity-key>`.
//   JournalCrashChild hold-reader DIR
//       Opens the LMDB environment, holds a read transaction, prints `reading`, and waits to be killed.
import DurableEntities
import Foundation
import LMDB
import Logging
import Synchronization
import TestSupport

let output = Mutex<Void>(())
/// Writes one line to stdout at once (a single write(2), so lines never interleave).
func emit(_ line: String) {
    output.withLock { _ in
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
    }
}
func fail(_ message: String) -> Never {
    let bytes = Array((message + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(2)
}

/// Holds a read transaction until the process is killed (synchronous: transactions cannot span an await).
func holdReader(_ directory: String) throws {
    let environment = try Environment.open(.init(directory: directory))
    let database = try environment.database("data")
    try environment.read { txn in
        _ = try txn.count(database)
        emit("reading")
        while true { sleep(60) }
    }
}

ParentWatch.exitWhenOrphaned()
let arguments = CommandLine.arguments
guard arguments.count >= 3 else {
    fail("usage: JournalCrashChild append DIR ENTITIES EVENTS_PER_BATCH | register DIR | hold-reader DIR")
}
let directory = arguments[2]
let quiet = Logger(label: "child", factory: { _ in SwiftLogNoOpLogHandler() })

switch arguments[1] {
case "append":
    let entityCount = Int(arguments[3]) ?? 100
    let eventsPerBatch = Int(arguments[4]) ?? 3
    // Small threshold and window so a kill can hit moves and log trimming too.
    let journal = try Journal(configuration: .init(directory: directory, coalesceThreshold: 8, logWindow: 512, logger: quiet))
    var keys: [EntityKey] = []
    for index in 0..<entityCount {
        keys.append(try await journal.register(EntityName(type: "Account", id: "acc-\(index)")))
    }
    emit("registered \(keys.count)")
    let workers = 8
    try await withThrowingTaskGroup(of: Void.self) { group in
        for worker in 0..<workers {
            let mine = keys.enumerated().filter { $0.offset % workers == worker }.map(\.element)
            group.addTask {
                var latest = try mine.map { try journal.latestSequence(of: $0) }
                var round = 0
                while true {
                    for (index, key) in mine.enumerated() {
                        var batch = JournalBatch()
                        for step in 1...eventsPerBatch {
                            let sequence = latest[index] + UInt64(step)
                            batch.append(key, sequence: sequence, payload: Array("\(key.rawValue):\(sequence)".utf8))
                        }
                        let last = latest[index] + UInt64(eventsPerBatch)
                        if round % 5 == 4 { batch.saveSnapshot(key, sequence: last, payload: Array("snap:\(last)".utf8)) }
                        _ = try await journal.commit(batch)
                        latest[index] = last
                        emit("ack \(key.rawValue) \(last)")
                    }
                    round += 1
                }
            }
        }
        try await group.waitForAll()
    }
case "register":
    let journal = try Journal(configuration: .init(directory: directory, deferredNameLimit: 16, logger: quiet))
    // Ids spread over the key space, unique across runs in one directory (the run's start in the id).
    let run = UInt64(DispatchTime.now().uptimeNanoseconds)
    try await withThrowingTaskGroup(of: Void.self) { group in
        for worker in 0..<8 {
            group.addTask {
                var n: UInt64 = 0
                while true {
                    n += 1
                    let id = "o-\((n &* 0x9E37_79B9_7F4A_7C15 &+ run) % 1_000_000_007)-\(worker)-\(n)"
                    let name = EntityName(type: "Order", id: id)
                    let key = try await journal.register(name, reservingKeyWithFirstEvent: n % 2 == 0 ? nil : Array(id.utf8))
                    emit("name \(id) \(key.rawValue)")
                }
            }
        }
        try await group.waitForAll()
    }
case "hold-reader":
    try holdReader(directory)
default:
    fail("unknown mode \(arguments[1])")
}
