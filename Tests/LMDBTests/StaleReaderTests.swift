import Foundation
import LMDB
import TestSupport
import Testing

@Suite("Stale readers of dead processes", .timeLimit(.minutes(10)))
struct StaleReaderTests {
    /// Starts `JournalCrashChild hold-reader DIR` and waits until it holds its read transaction.
    private static func startReader(_ directory: String) async throws -> ChildProcess {
        let child = try ChildProcess("JournalCrashChild", arguments: ["hold-reader", directory])
        let line = await child.readLine()
        guard line == "reading" else {
            child.kill()
            throw ChildProcessError(message: "the child printed \(String(describing: line)) instead of 'reading'")
        }
        return child
    }

    @Test("a reader SIGKILLed while another process keeps the environment open is counted and cleared at open")
    func staleReaderClearedWhileOthersOpen() async throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let doomed = try await Self.startReader(scratch.path)
        let survivor = try await Self.startReader(scratch.path)
        defer { survivor.kill() }
        doomed.kill()
        #expect(doomed.process.terminationReason == .uncaughtSignal)
        #expect(doomed.process.terminationStatus == SIGKILL)

        try Self.checkReopened(scratch.path, staleReadersCleared: 1)
    }

    /// Opens the directory again: `staleReadersCleared` as expected, and the database the child
    /// created is there and takes writes.
    private static func checkReopened(_ directory: String, staleReadersCleared: Int) throws {
        let environment = try Environment.open(.init(directory: directory))
        defer { environment.close() }
        #expect(environment.staleReadersCleared == staleReadersCleared)
        let data = try environment.database("data", create: false)
        try environment.write { txn in try txn.put(bytes("v"), forKey: bytes("k"), in: data) }
        #expect(try environment.read { try $0.value(forKey: bytes("k"), in: data) } == bytes("v"))
        #expect(try environment.read { try $0.count(data) } == 1)
    }

    @Test("a reader SIGKILLed while it was the only opener: its slot is cleared at open")
    func staleReaderClearedWhenAlone() async throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let child = try await Self.startReader(scratch.path)
        child.kill()
        #expect(child.process.terminationReason == .uncaughtSignal)

        // LMDB re-initialises the whole reader table when an opener finds no other process attached
        // (mdb_env_setup_locks with the exclusive lock), so the dead reader's slot is dropped before
        // mdb_reader_check runs: it is cleared, and counted as 0 (as Environment documents).
        try Self.checkReopened(scratch.path, staleReadersCleared: 0)
    }
}
