import Foundation
import Synchronization

/// A scenario's progress over time, sampled on a thread of its own: how a run's throughput varies
/// from one tenth of a second to the next, and what each group of threads did meanwhile.
///
/// Every `interval` it takes one row: the time since ``start(columns:)``, the operations completed so
/// far (``operationCompleted()``), the process's CPU time, the scenario's own columns (say the
/// journal's commits), and for each group of threads (named alike but for a trailing number:
/// `de-shard-0` and `de-shard-1` are `de-shard`) the CPU time its threads ran and the time they
/// waited, runnable, for a processor (`/proc/self/task/*/schedstat`). Every value is cumulative, so
/// the difference of two rows is what happened between them; a thread that ended takes its share
/// out of its group's sums.
///
/// ``stop()`` writes the rows as a tab-separated file with a header, and ``windows(of:)`` gives the
/// throughput of consecutive windows, whose spread is what a closed-loop scenario's p99 follows.
///
/// ```swift
/// let timeline = Timeline(path: "/tmp/saga.tsv")
/// timeline.start { [("commits", Double(journal.statistics.commits))] }
/// // each client, per completed operation:
/// timeline.operationCompleted()
/// try timeline.stop()
/// ```
final class Timeline: Sendable {
    /// One sample: fixed fields, the scenario's columns, and per thread group (CPU ms, wait ms).
    private struct Row: Sendable {
        var milliseconds: Double
        /// Taken after ``measuredRegionOpened()``.
        var measured: Bool
        var operations: Int
        var cpuMilliseconds: Double
        var columns: [(String, Double)]
        var groups: [String: (cpu: Double, wait: Double)]
    }

    private struct State: Sendable {
        var rows: [Row] = []
        var started = false
    }

    let path: String
    let interval: Duration
    private let completed = Atomic<Int>(0)
    private let measuring = Atomic<Bool>(false)
    private let stopping = Atomic<Bool>(false)
    private let state = Mutex(State())
    /// Signalled by the sampling thread when it has taken its last row.
    private let finished = DispatchSemaphore(value: 0)

    init(path: String, interval: Duration = .milliseconds(20)) {
        self.path = path
        self.interval = interval
    }

    /// The scenario's measured region begins (after its warm-up): later rows say so, and
    /// ``windows(of:)`` starts there.
    func measuredRegionOpened() { measuring.store(true, ordering: .releasing) }

    /// Counts one completed operation (from any thread).
    func operationCompleted() { completed.add(1, ordering: .relaxed) }

    /// Starts sampling; `columns` gives the scenario's own cumulative values at each sample.
    func start(columns: @escaping @Sendable () -> [(String, Double)] = { [] }) {
        let started = ContinuousClock.now
        let thread = Thread { [self] in
            Thread.current.name = "bench-timeline"  // from inside: see `OpenLoopSchedule.init`
            let pause = UInt32(clamping: max(1, interval.nanosecondsClamped / 1_000))  // µs
            while !stopping.load(ordering: .acquiring) {
                let row = Row(milliseconds: started.duration(to: .now).milliseconds, measured: measuring.load(ordering: .acquiring),
                              operations: completed.load(ordering: .relaxed),
                              cpuMilliseconds: ProcessCPU.now().milliseconds, columns: columns(), groups: Self.threadGroups())
                state.withLock { $0.rows.append(row) }
                usleep(pause)
            }
            finished.signal()
        }
        state.withLock { $0.started = true }
        thread.start()
    }

    /// Stops sampling and writes the file.
    func stop() throws {
        guard state.withLock({ $0.started }), !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        finished.wait()
        let rows = state.withLock { $0.rows }
        // Groups seen in any row, in a fixed order: the threads of a scenario come and go.
        let groups = Set(rows.flatMap { $0.groups.keys }).sorted()
        var header = ["ms", "measured", "operations", "process_cpu_ms"]
        header += rows.first?.columns.map(\.0) ?? []
        for group in groups { header += ["\(group)_cpu_ms", "\(group)_wait_ms"] }
        var text = header.joined(separator: "\t") + "\n"
        for row in rows {
            var fields = [String(format: "%.3f", row.milliseconds), row.measured ? "1" : "0", String(row.operations), String(format: "%.3f", row.cpuMilliseconds)]
            fields += row.columns.map { String(format: "%.3f", $0.1) }
            for group in groups {
                let value = row.groups[group] ?? (0, 0)
                fields += [String(format: "%.3f", value.cpu), String(format: "%.3f", value.wait)]
            }
            text += fields.joined(separator: "\t") + "\n"
        }
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// The throughput (operations per second) of consecutive windows of `window` (whole samples) in
    /// the measured region (from the first sample with a completed operation if it was never opened).
    func windows(of window: Duration) -> [Double] {
        let all = state.withLock { $0.rows }
        let rows = all.contains(where: \.measured) ? all.drop { !$0.measured } : all.drop { $0.operations == 0 }
        guard let first = rows.first else { return [] }
        var throughputs: [Double] = []
        var start = first
        for row in rows where row.milliseconds - start.milliseconds >= window.milliseconds {
            throughputs.append(Double(row.operations - start.operations) * 1_000 / (row.milliseconds - start.milliseconds))
            start = row
        }
        return throughputs
    }

    /// CPU and run-queue wait (ms) of this process's threads, summed by name without a trailing number.
    private static func threadGroups() -> [String: (cpu: Double, wait: Double)] {
        var groups: [String: (cpu: Double, wait: Double)] = [:]
        guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task") else { return groups }
        for task in tasks {
            // schedstat: nanoseconds on a CPU, nanoseconds waiting on a run queue, time slices.
            guard let comm = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
                  let stat = try? String(contentsOfFile: "/proc/self/task/\(task)/schedstat", encoding: .utf8)
            else { continue }  // the thread ended meanwhile
            let fields = stat.split(separator: " ").compactMap { Double($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            guard fields.count >= 2 else { continue }
            let key = group(of: comm.trimmingCharacters(in: .whitespacesAndNewlines))
            let sum = groups[key] ?? (0, 0)
            groups[key] = (sum.cpu + fields[0] / 1e6, sum.wait + fields[1] / 1e6)
        }
        return groups
    }

    /// A thread's group: its name without a trailing number; Dispatch's worker threads (whose names
    /// the kernel cuts to their last 15 characters) by their root queue.
    private static func group(of name: String) -> String {
        for (suffix, group) in [("overcommit", "dispatch-overcommit"), ("default-qos", "dispatch-default"),
                                ("background-qos", "dispatch-background"), ("utility-qos", "dispatch-utility")] where name.hasSuffix(suffix) {
            return group
        }
        var trimmed = Substring(name)
        while let last = trimmed.last, last.isNumber || last == "-" { trimmed = trimmed.dropLast() }
        return trimmed.isEmpty ? "thread" : String(trimmed)
    }
}
