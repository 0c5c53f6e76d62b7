import Foundation
import LMDB

/// A fresh directory under the system's temporary directory, one per test, removed by ``remove()``.
struct ScratchDirectory: Sendable {
    let path: String

    init(_ label: String = #function) {
        let name = "lmdb-\(label.filter { $0.isLetter || $0.isNumber }.prefix(40))-\(UUID().uuidString)"
        path = FileManager.default.temporaryDirectory.appendingPathComponent(name).path
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    /// A path inside the directory.
    func child(_ name: String) -> String { path + "/" + name }

    /// A configuration for an environment in this directory (or a sub-directory of it).
    func configuration(
        _ subdirectory: String? = nil,
        mapSize: Int = 1 << 24,
        maxMapSize: Int = 1 << 40,
        durability: Environment.Durability = .relaxed
    ) -> Environment.Configuration {
        .init(directory: subdirectory.map(child) ?? path, mapSize: mapSize, maxMapSize: maxMapSize, durability: durability)
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// The UTF-8 bytes of `text`.
func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

/// `n` as four big-endian bytes: byte order equals numeric order.
func bigEndian(_ n: UInt32) -> [UInt8] { withUnsafeBytes(of: n.bigEndian) { Array($0) } }

/// Decodes four big-endian bytes.
func decodeBigEndian(_ bytes: some Collection<UInt8>) -> UInt32 {
    bytes.prefix(4).reduce(0) { $0 << 8 | UInt32($1) }
}

/// A value of `count` bytes, different for every `seed`, so a read can tell values apart.
func pattern(_ seed: UInt32, count: Int) -> [UInt8] {
    var state = seed &* 2_654_435_761 &+ 1
    return (0..<count).map { _ in
        state = state &* 1_103_515_245 &+ 12_345
        return UInt8(truncatingIfNeeded: state >> 16)
    }
}
