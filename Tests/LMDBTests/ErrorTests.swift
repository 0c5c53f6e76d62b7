import Foundation
import LMDB
import Testing

@Suite("Errors: codes, operations and paths")
struct ErrorTests {
    @Test(".noOverwrite on an existing key throws keyExists naming mdb_put and the path")
    func noOverwriteIsKeyExists() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        try environment.write { txn in try txn.put(bytes("first"), forKey: bytes("k"), in: data, flags: .noOverwrite) }
        let error = try #require(throws: LMDBError.self) {
            try environment.write { txn in try txn.put(bytes("second"), forKey: bytes("k"), in: data, flags: .noOverwrite) }
        }
        #expect(error.code == .keyExists)
        #expect(error.returnCode == -30799)  // MDB_KEYEXIST
        #expect(error.operation.contains("mdb_"))
        #expect(error.operation.contains("mdb_put"))
        #expect(error.operation.contains("data"))
        #expect(error.path == environment.path)
        #expect(error.description.contains(environment.path))
        #expect(error.description.contains(error.operation))
        #expect(error.description.contains("keyExists"))
        #expect(!error.message.isEmpty)
        #expect(try environment.read { try $0.value(forKey: bytes("k"), in: data) } == bytes("first"))
    }

    @Test("a key of a size LMDB refuses throws badValueSize", arguments: [0, 512, 600])
    func oversizedKeyIsBadValueSize(keyLength: Int) throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        let key = [UInt8](repeating: 0x61, count: keyLength)
        let error = try #require(throws: LMDBError.self) {
            try environment.write { txn in try txn.put(bytes("v"), forKey: key, in: data) }
        }
        #expect(error.code == .badValueSize)
        #expect(error.returnCode == -30781)  // MDB_BAD_VALSIZE
        #expect(error.operation.contains("mdb_put"))
        #expect(error.path == environment.path)
        #expect(try environment.read { try $0.count(data) } == 0)
    }

    @Test("the largest key LMDB accepts (511 bytes) round-trips")
    func largestKey() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let data = try environment.database("data")
        let key = [UInt8](repeating: 0x62, count: 511)
        try environment.write { txn in try txn.put(bytes("v"), forKey: key, in: data) }
        #expect(try environment.read { try $0.value(forKey: key, in: data) } == bytes("v"))
    }

    @Test("opening a missing database without create throws notFound naming mdb_dbi_open and the path")
    func missingDatabaseIsNotFound() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        let environment = try Environment.open(scratch.configuration())
        defer { environment.close() }
        let error = try #require(throws: LMDBError.self) { try environment.database("x", create: false) }
        #expect(error.code == .notFound)
        #expect(error.returnCode == -30798)  // MDB_NOTFOUND
        #expect(error.operation.contains("mdb_dbi_open"))
        #expect(error.operation.contains("x"))
        #expect(error.path == environment.path)
        // Failing did not create it, and the environment still works.
        #expect(throws: LMDBError.self) { try environment.database("x", create: false) }
        let created = try environment.database("x")
        #expect(created.name == "x")
        #expect(try environment.database("x", create: false) == created)
    }

    @Test("more named databases than maxDatabases throws databasesFull")
    func tooManyDatabases() throws {
        let scratch = ScratchDirectory()
        defer { scratch.remove() }
        var configuration = scratch.configuration()
        configuration.maxDatabases = 2
        let environment = try Environment.open(configuration)
        defer { environment.close() }
        _ = try environment.database("one")
        _ = try environment.database("two")
        let error = try #require(throws: LMDBError.self) { try environment.database("three") }
        #expect(error.code == .databasesFull)
        #expect(error.operation.contains("mdb_dbi_open"))
    }

    @Test("an operating-system error maps to .system with errno as the return code")
    func systemErrorCarriesErrno() {
        let error = LMDBError(returnCode: ENOENT, operation: "mdb_env_open", path: "/nowhere")
        #expect(error.code == .system)
        #expect(error.returnCode == ENOENT)
        #expect(error.description.contains("/nowhere"))
        #expect(error.description.contains("mdb_env_open"))
        #expect(error.message == String(cString: strerror(ENOENT)))
    }
}
