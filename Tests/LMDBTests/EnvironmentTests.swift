import Foundation
import LMDB
import Testing

@Suite("Environment: opening, sharing and closing")
struct EnvironmentTests {
    @Test("open creates a missing directory and reports its canonical path")
    func openCreatesDirectory() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration("fresh"))
        defer { environment.close() }
        var isDirectory: ObjCBool = false
        #expect(FileManager.default.fileExists(atPath: scratch.child("fresh"), isDirectory: &isDirectory) && isDirectory.boolValue)
        #expect(FileManager.default.fileExists(atPath: scratch.child("fresh/data.mdb")))
        #expect(FileManager.default.fileExists(atPath: scratch.child("fresh/lock.mdb")))
        #expect(environment.path == URL(fileURLWithPath: scratch.child("fresh")).resolvingSymlinksInPath().path)
        #expect(environment.staleReadersCleared == 0)
        #expect(!environment.isClosed)
    }

    @Test("two opens of one directory share one instance, and it stays usable until the second close")
    func sharedInstanceCountsCloses() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let configuration = scratch.configuration()
        let first = try Environment.open(configuration)
        let second = try Environment.open(configuration)
        #expect(first === second)

        let data = try first.database("data")
        try second.write { txn in try txn.put(bytes("v"), forKey: bytes("k"), in: data) }

        first.close()
        #expect(!second.isClosed)
        #expect(try second.read { try $0.value(forKey: bytes("k"), in: data) } == bytes("v"))
        try second.write { txn in try txn.put(bytes("w"), forKey: bytes("k2"), in: data) }

        second.close()
        #expect(second.isClosed)
        let error = try #require(throws: LMDBError.self) { try second.read { try $0.count(data) } }
        #expect(error.code == .badTransaction)
        #expect(error.path == second.path)
        let writeError = try #require(throws: LMDBError.self) {
            try second.write { txn in try txn.put(bytes("x"), forKey: bytes("x"), in: data) }
        }
        #expect(writeError.code == .badTransaction)
        second.close()  // one close too many: no effect
        #expect(second.isClosed)

        // After the last close, opening again makes a new instance that sees the committed data.
        let third = try Environment.open(configuration)
        defer { third.close() }
        #expect(third !== first)
        let reopened = try third.database("data", create: false)
        #expect(try third.read { try $0.count(reopened) } == 2)
    }

    @Test("the same directory spelled differently (trailing '/.', a symlink) is the same instance")
    func samePathDifferentSpelling() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration("env"))
        try FileManager.default.createSymbolicLink(atPath: scratch.child("link"), withDestinationPath: scratch.child("env"))
        let dotted = try Environment.open(scratch.configuration("env/."))
        let linked = try Environment.open(scratch.configuration("link"))
        #expect(dotted === environment)
        #expect(linked === environment)
        environment.close()
        dotted.close()
        #expect(!environment.isClosed)
        linked.close()
        #expect(environment.isClosed)
    }

    @Test("opening an open directory with another configuration throws alreadyOpenDifferently and leaves it open once",
          arguments: [
            Environment.Configuration(directory: "", mapSize: 1 << 24, durability: .durable),
            Environment.Configuration(directory: "", mapSize: 1 << 25, durability: .relaxed),
            Environment.Configuration(directory: "", mapSize: 1 << 24, durability: .relaxed, writeMap: true),
          ])
    func differentConfigurationThrows(other: Environment.Configuration) throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let configuration = Environment.Configuration(directory: scratch.path, mapSize: 1 << 24, durability: .relaxed)
        let environment = try Environment.open(configuration)
        var different = other
        different.directory = scratch.path
        let error = try #require(throws: LMDBError.self) { try Environment.open(different) }
        #expect(error.code == .alreadyOpenDifferently)
        #expect(error.path == environment.path)
        #expect(error.description.contains(environment.path))
        // The refused open was not counted: one close closes.
        environment.close()
        #expect(environment.isClosed)
        // Once closed, the other configuration opens fine.
        let reopened = try Environment.open(different)
        #expect(reopened.configuration.durability == different.durability)
        reopened.close()
    }

    /// The open file descriptors of this process whose target lies under `directory`.
    ///
    /// Counted through `/proc/self/fd`, but only those pointing into the test's own directory: tests run
    /// in parallel in this process and open and close descriptors of their own meanwhile.
    private static func descriptors(under directory: String) throws -> [String] {
        let entries = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")
        return entries.compactMap { entry in
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + entry) else { return nil }
            return target.hasPrefix(directory) ? target : nil
        }
    }

    @Test("a failed open (the directory is a regular file) throws a typed error and leaks no descriptor")
    func failedOpenOnRegularFile() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let file = scratch.child("not-a-directory")
        #expect(FileManager.default.createFile(atPath: file, contents: Data("plain file".utf8)))
        let before = try Self.descriptors(under: scratch.path)
        for _ in 0..<20 {
            let error = try #require(throws: LMDBError.self) { try Environment.open(scratch.configuration("not-a-directory")) }
            #expect(error.code == .system)
            #expect(error.returnCode == ENOTDIR)
            #expect(error.operation.contains("mdb_env_open"))
            #expect(error.path.hasSuffix("not-a-directory"))
        }
        #expect(try Self.descriptors(under: scratch.path) == before)
        #expect(before.isEmpty)
        // Nothing stays registered: the path is still a plain file and still refuses.
        #expect(throws: LMDBError.self) { try Environment.open(scratch.configuration("not-a-directory")) }
    }

    @Test("a failed open after LMDB opened its files (data.mdb is not an LMDB file) closes them all")
    func failedOpenOnInvalidDataFile() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        try FileManager.default.createDirectory(atPath: scratch.child("bad"), withIntermediateDirectories: false)
        #expect(FileManager.default.createFile(atPath: scratch.child("bad/data.mdb"), contents: Data(repeating: 0xAB, count: 16_384)))
        let before = try Self.descriptors(under: scratch.path)
        for _ in 0..<20 {
            let error = try #require(throws: LMDBError.self) { try Environment.open(scratch.configuration("bad")) }
            #expect(error.code == .invalidFile)
            #expect(error.operation.contains("mdb_env_open"))
            #expect(error.path.hasSuffix("bad"))
        }
        let after = try Self.descriptors(under: scratch.path)
        #expect(after == before, "descriptors left open: \(after)")
        #expect(before.isEmpty)
        // The directory is not left registered as open: a valid environment opens there once the file is fixed.
        try FileManager.default.removeItem(atPath: scratch.child("bad/data.mdb"))
        let environment = try Environment.open(scratch.configuration("bad"))
        #expect(try Self.descriptors(under: scratch.path).count >= 2)
        environment.close()
        #expect(try Self.descriptors(under: scratch.path).isEmpty)
    }
}
