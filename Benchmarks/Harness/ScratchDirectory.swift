import Foundation

/// A uniquely named, initially empty directory for one scenario run, removed by ``remove()``.
///
/// Note: a `tmpfs` parent (some systems mount `/tmp` that way) turns every fsync into a no-op;
/// point `--data-dir` at a real disk when durability costs are what is being measured.
struct ScratchDirectory: Sendable {
    /// Absolute path of the directory.
    let path: String

    init(label: String, parent: String? = nil) throws {
        let base = parent ?? FileManager.default.temporaryDirectory.path
        let unique = UUID().uuidString.prefix(8).lowercased()
        path = (base as NSString).appendingPathComponent(
            "durable-bench-\(label)-\(ProcessInfo.processInfo.processIdentifier)-\(unique)")
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    /// Deletes the directory and everything in it; errors are ignored.
    func remove() {
        try? FileManager.default.removeItem(atPath: path)
    }
}
