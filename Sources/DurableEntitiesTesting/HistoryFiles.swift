import DurableEntities
import Foundation

/// Golden histories on disk: export an entity's run as JSON once, commit the file, and replay it
/// against every later version of the code (``ExportedHistory/replay(as:codec:logger:)``).
public enum HistoryFiles {
    /// Writes `history` as pretty-printed JSON.
    public static func save(_ history: ExportedHistory, to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(history).write(to: URL(fileURLWithPath: path))
    }

    /// Reads a history written by ``save(_:to:)``.
    public static func load(_ path: String) throws -> ExportedHistory {
        try JSONDecoder().decode(ExportedHistory.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
    }
}
