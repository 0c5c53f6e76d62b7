import Foundation

/// A helper executable of this package, started as a child process whose stdout the test reads line
/// by line, and which the test can kill with SIGKILL.
public final class ChildProcess: @unchecked Sendable {
    public let process = Process()
    private let pipe = Pipe()
    /// The child's standard input, never written: its write end closes when this process ends (or
    /// drops this object), which a child's ``ParentWatch`` sees as end of file.
    private let input = Pipe()
    private var buffer: [UInt8] = []
    private let exited = DispatchSemaphore(value: 0)

    /// Finds an executable product built next to the test bundle (`swift build --build-tests` builds it).
    public static func executable(_ name: String) throws -> URL {
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")).map(URL.init(fileURLWithPath:))
        for candidate in [directory, exe?.deletingLastPathComponent()].compactMap({ $0 }) {
            // Inside an .xctest bundle on some layouts: walk up until the product is found.
            var url = candidate
            for _ in 0..<4 {
                let path = url.appendingPathComponent(name)
                if FileManager.default.isExecutableFile(atPath: path.path) { return path }
                url = url.deletingLastPathComponent()
            }
            directory = candidate
        }
        throw ChildProcessError(message: "executable '\(name)' not found near \(directory.path); run `swift build --build-tests` first")
    }

    public init(_ name: String, arguments: [String]) throws {
        process.executableURL = try Self.executable(name)
        process.arguments = arguments
        process.standardOutput = pipe
        process.standardInput = input
        process.standardError = FileHandle.standardError
        process.terminationHandler = { [exited] _ in exited.signal() }
        // A small pipe: the child runs at most ~4 KiB of output ahead of the test, so "kill after N
        // acknowledgements" kills it near there even when the test's task waits for a thread.
        _ = fcntl(pipe.fileHandleForWriting.fileDescriptor, 1031 /* F_SETPIPE_SZ */, 4_096)
        try process.run()
    }

    /// The next line the child printed, or `nil` at end of output. Waits until one arrives; the
    /// blocking read runs on a thread of its own, not on the cooperative pool (crash tests of other
    /// suites keep running meanwhile). One reader at a time.
    public func readLine() async -> String? {
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                return line
            }
            let reader = pipe.fileHandleForReading
            let chunk = await withCheckedContinuation { (continuation: CheckedContinuation<Data, Never>) in
                Thread { continuation.resume(returning: reader.availableData) }.start()
            }
            if chunk.isEmpty {
                defer { buffer.removeAll() }
                return buffer.isEmpty ? nil : String(decoding: buffer, as: UTF8.self)
            }
            buffer.append(contentsOf: chunk)
        }
    }

    /// Waits until the child exits, at most `timeout`; returns whether it did.
    public func waitForExit(timeout: Duration) -> Bool {
        let (seconds, attoseconds) = timeout.components
        let nanoseconds = Double(seconds) * 1e9 + Double(attoseconds) / 1e9
        guard exited.wait(timeout: .now() + .nanoseconds(Int(nanoseconds))) == .success else { return false }
        exited.signal()  // later waits return at once too
        process.waitUntilExit()  // the status is set once Foundation has reaped it
        return true
    }

    /// Kills the child with SIGKILL and waits for it.
    public func kill() {
        _ = Foundation.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// Every line still in the pipe after the child died: what it printed before the kill.
    public func remainingLines() async -> [String] {
        var lines: [String] = []
        while let line = await readLine() { lines.append(line) }
        return lines
    }
}

public struct ChildProcessError: Error, CustomStringConvertible {
    public let message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

/// For helper executables that a test (or a benchmark) starts and kills: ends this process once the
/// process that started it is gone. A parent killed with SIGKILL (a test run stopped by a watchdog)
/// cannot kill its children, and a child that appends or deposits until it is killed would run on,
/// loading the machine for every later run (seen: two such children for an hour).
public enum ParentWatch {
    /// When standard input is a pipe (``ChildProcess`` gives its child one and never writes to it),
    /// starts a thread that reads it and exits (status 3) at end of file: the kernel closes the
    /// parent's end when the parent dies, however it dies. Otherwise (run by hand) does nothing.
    public static func exitWhenOrphaned() {
        var status = stat()
        guard fstat(0, &status) == 0, status.st_mode & S_IFMT == S_IFIFO else { return }
        let thread = Thread {
            var byte: UInt8 = 0
            while true {
                let count = read(0, &byte, 1)
                if count == 0 || (count < 0 && errno != EINTR) { _exit(3) }
            }
        }
        thread.start()
    }
}
