import Foundation
import LMDB
import TestSupport
import Testing

@Suite("Stale readers of dead processes", .timeLimit(.minutes(1)))
struct StaleReaderTests {
    /// Starts `JournalCrashChild hold-reader DIR` and waits until it holds its read transaction.
    private static func startReader(_ directory: String) throws -> ChildProcess {
        let child = try ChildProcess("JournalCrashChild", arguments: ["hold-reader", directory])
        let line = child.readLine()
        guard line == "reading" else {
            child.kill()
            throw ChildProcessError(message: "the child printed \(String(describing: line)) instead of 'reading'")
        }
        return child
    }

    @Test("a reader SIGKILLed while another process keeps the environment open is counted and cleared at open")
    func staleReaderClearedWhileOthersOpen() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let doomed = try Self.startReader(scratch.path)
        let survivor = try Self.startReader(scratch.path)
        defer { survivor.kill() }
        doomed.kill()
        #expect(doomed.process.terminationReason == .uncaughtSignal)
        #expect(doomed.process.terminationStatus == SIGKILL)

        let environment = try Environment.open(.init(directory: scratch.path))
        defer { environment.close() }
        #expect(environment.staleReadersCleared == 1)
        // The environment works: the database the child created is there and takes writes.
        let data = try environment.database("data", create: false)
        try environment.write { txn in try txn.put(bytes("v"), forKey: bytes("k"), in: data) }
        #expect(try environment.read { try $0.value(forKey: bytes("k"), in: data) } == bytes("v"))
    }

    @Test("a reader SIGKILLed while it was the only opener: its slot is cleared at open")
    func staleReaderClearedWhenAlone() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let child = try Self.startReader(scratch.path)
        child.kill()
        #expect(child.process.terminationReason == .uncaughtSignal)

        let environment = try Environment.open(.init(directory: scratch.path))
        defer { environment.close() }
        // LMDB re-initialises the whole reader table when an opener finds no other process attached
        // (mdb_env_setup_locks with the exclusive lock), so the dead reader's slot is dropped before
        // mdb_reader_check runs: it is cleared, and counted as 0 (as Environment documents).
        #expect(environment.staleReadersCleared == 0)
        let data = try environment.database("data", create: false)
        try environment.write { txn in try txn.put(bytes("v"), forKey: bytes("k"), in: data) }
        #expect(try environment.read { try $0.count(data) } == 1)
    }
}
