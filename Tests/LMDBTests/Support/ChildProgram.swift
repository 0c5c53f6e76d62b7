import Foundation

/// A helper executable of this package run as a child process: the test reads its stdout line by line
/// and can kill it with SIGKILL.
final class ChildProgram {
    let process = Process()
    private let pipe = Pipe()
    private var buffer: [UInt8] = []

    /// Finds an executable built next to the test binary (`swift build --build-tests` builds it): looks
    /// in the directory of `CommandLine.arguments[0]` (and of `/proc/self/exe`) and up to 4 parents.
    static func executable(_ name: String) throws -> URL {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")).map(URL.init(fileURLWithPath:))
        let starts = [URL(fileURLWithPath: CommandLine.arguments[0]), exe].compactMap { $0?.deletingLastPathComponent() }
        for start in starts {
            var url = start
            for _ in 0...4 {
                let candidate = url.appendingPathComponent(name)
                if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
                url = url.deletingLastPathComponent()
            }
        }
        throw ChildProgramError(
            message: "executable '\(name)' not found near \(starts.map(\.path)); run `swift build --build-tests` first")
    }

    init(_ name: String, arguments: [String]) throws {
        process.executableURL = try Self.executable(name)
        process.arguments = arguments
        process.standardOutput = pipe
        process.standardError = FileHandle.standardError
        try process.run()
    }

    /// The next line the child printed, or `nil` at end of output. Blocks until one arrives.
    func readLine() -> String? {
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                return line
            }
            let chunk = pipe.fileHandleForReading.availableData
            if chunk.isEmpty { return buffer.isEmpty ? nil : String(decoding: buffer, as: UTF8.self) }
            buffer.append(contentsOf: chunk)
        }
    }

    /// Kills the child with SIGKILL and waits for it to be reaped.
    func kill() {
        _ = Foundation.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }
}

struct ChildProgramError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}
