import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Peak resident set size per scenario.
///
/// On Linux the kernel's high-water mark (`VmHWM` in `/proc/self/status`) can be reset by writing
/// `5` to `/proc/self/clear_refs`, so each scenario's peak is its own (it still includes the
/// harness's baseline and whatever the allocator kept from earlier scenarios, which
/// ``resetPeak()`` trims first). Elsewhere the figure falls back to `getrusage`'s `ru_maxrss`,
/// the peak of the whole process so far.
enum PeakMemory {
    /// Where a peak figure comes from.
    enum Scope: String, Sendable {
        /// Reset before the scenario: the peak of this scenario alone.
        case scenario
        /// Never reset: the peak of the process so far (an upper bound).
        case process
    }

    /// Returns freed memory to the system and resets the kernel's high-water mark.
    ///
    /// - Returns: `true` if the reset worked, so the next ``peakMegabytes()`` is per scenario.
    @discardableResult
    static func resetPeak() -> Bool {
        trimMallocArenas()
        #if os(Linux)
        let fd = open("/proc/self/clear_refs", O_WRONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return write(fd, "5", 1) == 1
        #else
        return false
        #endif
    }

    /// The peak resident set size in megabytes (2^20 bytes), or `nil` if it cannot be read.
    static func peakMegabytes() -> Double? {
        if let kilobytes = statusField("VmHWM") { return Double(kilobytes) / 1024 }
        var usage = rusage()
        #if canImport(Glibc)
        let who = __rusage_who_t(RUSAGE_SELF.rawValue)
        #else
        let who = RUSAGE_SELF
        #endif
        guard getrusage(who, &usage) == 0 else { return nil }
        #if canImport(Darwin)
        return Double(usage.ru_maxrss) / 1_048_576  // bytes on Darwin
        #else
        return Double(usage.ru_maxrss) / 1024  // kilobytes on Linux
        #endif
    }

    /// The resident set now in megabytes, or `nil` if it cannot be read (not Linux): `anonymous` is
    /// the process's own memory (heap, stacks: `RssAnon`), `mapped` its resident file pages (`RssFile`,
    /// mostly LMDB's memory map, which the kernel can drop and read back).
    static func current() -> (anonymous: Double, mapped: Double)? {
        guard let anonymous = statusField("RssAnon"), let mapped = statusField("RssFile") else { return nil }
        return (Double(anonymous) / 1024, Double(mapped) / 1024)
    }

    /// Calls glibc's `malloc_trim(0)` when present, so memory an earlier scenario freed is returned
    /// to the system and does not count toward the next scenario's peak. The Glibc module does not
    /// export `malloc.h`, hence the look-up by name; elsewhere this does nothing.
    private static func trimMallocArenas() {
        #if os(Linux)
        typealias MallocTrim = @convention(c) (Int) -> Int32
        guard let handle = dlopen(nil, RTLD_NOW) else { return }
        defer { dlclose(handle) }
        guard let symbol = dlsym(handle, "malloc_trim") else { return }
        _ = unsafeBitCast(symbol, to: MallocTrim.self)(0)
        #endif
    }

    /// A `kB` field of `/proc/self/status`, e.g. `VmHWM:    12345 kB`.
    private static func statusField(_ name: String) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix(name + ":") {
            let digits = line.dropFirst(name.count + 1).filter(\.isNumber)
            return Int(digits)
        }
        return nil
    }
}
