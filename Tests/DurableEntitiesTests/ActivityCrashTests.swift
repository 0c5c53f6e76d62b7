@testable import DurableEntities
import Foundation
import Synchronization
import TestSupport
import Testing

// The activity side of crash safety: `EntityCrashChild activities|saga` runs activities and is
// SIGKILLed while some are in flight; this process reopens the directory with activity
// implementations that behave the same and checks what ran again and what took effect.
//
// The side-effect table is DIR/effects.log: one line per effect ending in the activity's idempotency
// key, appended only if the key has no line yet (as an idempotent receiver with a unique index would),
// by the child and by this process alike.

/// The side-effect table (the same as the child's `EffectsFile`).
final class CrashEffectsFile: Sendable {
    let path: String
    private let lock = Mutex<Void>(())

    init(_ path: String) { self.path = path }

    /// Appends `line` unless a line for `key` is there already; returns whether it appended.
    func applyOnce(key: String, line: String) -> Bool {
        lock.withLock { _ in
            if lines.contains(where: { Self.key(of: $0) == key }) { return false }
            let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT, 0o644)
            precondition(descriptor >= 0, "cannot open \(path)")
            defer { close(descriptor) }
            let bytes = Array((line + "\n").utf8)
            let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
            precondition(written == bytes.count, "short write to \(path)")
            return true
        }
    }

    /// Every line, in the order appended.
    var lines: [String] {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    /// A line's idempotency key: its last space-separated field.
    static func key(of line: String) -> String { line.split(separator: " ").last.map(String.init) ?? "" }
}

/// The child's `ActivityJob`: one activity per entity, returning its output (the idempotency key).
struct CrashActivityJob: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "ActivityJob" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        try await context.execute(CrashEffect.self, input, options: .init(retry: .init(initialInterval: .milliseconds(10))))
    }
}

/// What the activities ran in this process: input (or name), idempotency key, whether the effect
/// was applied by this run (`false`: the key's line was already there).
final class CrashRunLog: Sendable {
    struct Run: Sendable, Equatable { var label: String; var key: String; var applied: Bool }
    private let runs = Mutex<[Run]>([])
    func add(_ run: Run) { runs.withLock { $0.append(run) } }
    var all: [Run] { runs.withLock { $0 } }
    /// What the child's activities do, without their stalls: applies the effect keyed by the
    /// attempt's idempotency key (once per key), logs the attempt, and returns the key.
    func apply(_ input: Int, context: ActivityContext, to effects: CrashEffectsFile) -> String {
        let key = context.idempotencyKey
        add(.init(label: "\(input)", key: key, applied: effects.applyOnce(key: key, line: key)))
        return key
    }
}

/// The child's `Effect` and `LocalEffect` (same name, input, output and side effect), without the stalls.
struct CrashEffect: Activity {
    static var name: String { "Effect" }
    let effects: CrashEffectsFile
    let log: CrashRunLog

    func run(_ input: Int, context: ActivityContext) async throws -> String {
        log.apply(input, context: context, to: effects)
    }
}

/// The child's `LocalJob`: one local activity per entity, returning its output (the idempotency key).
struct CrashLocalJob: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "LocalJob" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        try await context.executeLocal(CrashEffect.self, input, options: .init(retry: .init(initialInterval: .milliseconds(10))))
    }
}

/// The child's `CancelJob`: one activity whose cancellation the run waits for.
struct CrashCancelJob: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "CancelJob" }
    static func initialState(id: String) -> State { State() }
    static func run(_ input: Int, context: WorkflowContext<Self>) async throws -> String {
        let options = ActivityOptions(retry: .init(initialInterval: .milliseconds(10)), cancellationType: .waitCancellationCompleted)
        do {
            return "done:" + (try await context.execute(CrashStubborn.self, input, options: options))
        } catch let failure as ActivityFailure {
            return "\(failure.reason):\(failure.attempts)"
        }
    }
}

/// The child's `Stubborn` (same name, input, output and side effect), without the stall.
struct CrashStubborn: Activity {
    static var name: String { "Stubborn" }
    let effects: CrashEffectsFile
    let log: CrashRunLog

    func run(_ input: Int, context: ActivityContext) async throws -> String {
        log.apply(input, context: context, to: effects)
    }
}

/// Names a saga step (the same names as the child's).
protocol CrashSagaStepName { static var name: String { get } }
enum CrashWithdrawStep: CrashSagaStepName { static var name: String { "Withdraw" } }
enum CrashDepositStep: CrashSagaStepName { static var name: String { "Deposit" } }
enum CrashRecordStep: CrashSagaStepName { static var name: String { "Record" } }
enum CrashUndoDepositStep: CrashSagaStepName { static var name: String { "UndoDeposit" } }
enum CrashRefundStep: CrashSagaStepName { static var name: String { "Refund" } }

/// The child's `SagaStep`: applies "<name> <key>" once; Record then throws (non-retryable).
struct CrashSagaStep<Step: CrashSagaStepName>: Activity {
    static var name: String { Step.name }
    let effects: CrashEffectsFile
    let log: CrashRunLog

    func run(_ input: Int64, context: ActivityContext) async throws -> Int64 {
        let key = context.idempotencyKey
        let applied = effects.applyOnce(key: key, line: "\(Step.name) \(key)")
        log.add(.init(label: Step.name, key: key, applied: applied))
        if Step.name == CrashRecordStep.name { throw NonRetryableError("the ledger refused the transfer") }
        return input
    }
}

/// The child's `CrashTransfer`: withdraw, deposit, record (fails) → undo-deposit, then refund.
struct CrashTransfer: EntityWorkflow {
    struct State: Codable, Sendable {}
    static var entityType: String { "CrashTransfer" }
    static func initialState(id: String) -> State { State() }
    static func run(_ amount: Int64, context: WorkflowContext<Self>) async throws -> String {
        let options = ActivityOptions(retry: .init(initialInterval: .milliseconds(10)))
        var saga = Saga()
        do {
            saga.addCompensation("refund") { _ = try await context.execute(CrashSagaStep<CrashRefundStep>.self, amount, options: options) }
            _ = try await context.execute(CrashSagaStep<CrashWithdrawStep>.self, amount, options: options)
            saga.addCompensation("undo-deposit") { _ = try await context.execute(CrashSagaStep<CrashUndoDepositStep>.self, amount, options: options) }
            _ = try await context.execute(CrashSagaStep<CrashDepositStep>.self, amount, options: options)
            _ = try await context.execute(CrashSagaStep<CrashRecordStep>.self, amount, options: options)
            return "completed"
        } catch let failure as ActivityFailure {
            try await saga.compensate()
            return "compensated after \(failure.activity)"
        }
    }
}

@Suite("Activity crash safety")
struct ActivityCrashTests {
    /// The same settings as the child's activity modes.
    func configuration(_ directory: TemporaryDirectory) -> EntityRuntime.Configuration {
        var configuration = EntityRuntime.Configuration(directory: directory.path, maxConcurrentActivities: 128, logger: quietLogger)
        configuration.journal.logger = quietLogger
        return configuration
    }

    /// The activity tasks still stored (owed) in the journal.
    func storedTasks(_ runtime: EntityRuntime) throws -> Int {
        try runtime.journal.tasks(prefix: [ActivityTask.keyPrefix]).count
    }

    /// What the `activities` child printed.
    struct ActivitiesRound {
        var keys: [Int: String] = [:]       // i → the idempotency key its first attempt ran with
        var attempts: [Int: Int] = [:]      // i → attempts in the child
        var applied = Set<Int>()
        var started = Set<Int>()
        var done: [Int: String] = [:]       // i → the committed result the child observed
        var cancelAcked = Set<Int>()        // runs whose cancellation the child saw durable

        mutating func record(_ line: String) {
            let parts = line.split(separator: " ").map(String.init)
            guard parts.count >= 2, let index = Int(parts[1]) else { return }
            switch (parts[0], parts.count) {
            case ("running", 3):
                if keys[index] == nil { keys[index] = parts[2] }
                attempts[index, default: 0] += 1
            case ("applied", 3): applied.insert(index)
            case ("started", 2): started.insert(index)
            case ("done", 3): done[index] = parts[2]
            case ("cancel-acked", 2): cancelAcked.insert(index)
            default: break
            }
        }
    }

    /// Runs the child with `arguments`, reads what it prints until `ready` holds (or it stops), then
    /// SIGKILLs it and reads what was left. Returns what it printed and whether the watchdog fired.
    func killChild(_ arguments: [String], when ready: (ActivitiesRound) -> Bool) async throws -> (round: ActivitiesRound, hung: Bool) {
        let child = try ChildProcess("EntityCrashChild", arguments: arguments)
        let watchdog = EntityCrashTests.Watchdog(child)
        var round = ActivitiesRound()
        while !ready(round), let line = await child.readLine() { round.record(line) }
        let hung = watchdog.disarm()
        child.kill()
        for line in await child.remainingLines() { round.record(line) }
        return (round, hung)
    }

    /// The results of the entities "job-<i>", i in 0..<count, plus those of `extra` (index → result),
    /// within 240 s — `nil` after recording an issue if they do not all come (the runtime is then left
    /// open on purpose: closing waits for work that may never finish).
    func jobResults<W: EntityWorkflow>(_ runtime: EntityRuntime, _ type: W.Type, count: Int, log: CrashRunLog,
                                       extra: [Int: @Sendable () async throws -> String] = [:]) async throws -> [Int: String]?
    where W.Output == String {
        do {
            return try await withDeadline(seconds: 240) {
                try await withThrowingTaskGroup(of: (Int, String).self) { group in
                    for index in 0..<count {
                        group.addTask { (index, try await runtime.entity(W.self, id: "job-\(index)").result()) }
                    }
                    for (index, result) in extra { group.addTask { (index, try await result()) } }
                    var results: [Int: String] = [:]
                    for try await (index, key) in group { results[index] = key }
                    return results
                }
            }
        } catch {
            let stored = try storedTasks(runtime)
            Issue.record("after reopen not every entity completed (\(error)); re-ran \(log.all.map(\.label)), \(stored) tasks stored")
            return nil
        }
    }

    @Test("SIGKILLed with 100 activities in flight or done: after reopen each uncommitted one runs again with the same idempotency key, one effect per activity")
    func killedWithActivitiesInFlight() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let count = 100
        let odd = Set((0..<count).filter { $0 % 2 == 1 })             // in flight at the kill, whatever the timing
        let appliesInChild = Set((0..<count).filter { $0 % 4 != 3 })   // i % 4 == 3 stalls before its effect

        // Kill once every start is acknowledged and every activity is running (so every task is
        // committed), every effect the child can apply is applied, and at least 20 completions are
        // committed. Odd activities never return in the child, so at least 50 are in flight.
        let (round, hung) = try await killChild(["activities", directory.path]) { round in
            round.started.count == count && round.keys.count == count && round.applied == appliesInChild && round.done.count >= 20
        }
        try #require(!hung, "the child hung: \(round.keys.count) running, \(round.applied.count) applied, \(round.done.count) done")
        try #require(round.keys.count == count, "the child stopped early: \(round.keys.count) activities running")
        #expect(round.attempts.values.allSatisfy { $0 == 1 }, "an activity ran twice in the child: \(round.attempts.filter { $0.value > 1 })")
        #expect(round.started == Set(0..<count))
        #expect(Set(round.done.keys).isDisjoint(with: odd), "an activity that never returned completed: \(round.done.keys.sorted())")
        for (index, key) in round.done { #expect(key == round.keys[index], "job-\(index) returned \(key), ran with \(round.keys[index] ?? "-")") }

        let effects = CrashEffectsFile(directory.path + "/effects.log")
        let beforeReopen = effects.lines
        #expect(beforeReopen.count == appliesInChild.count && Set(beforeReopen) == Set(appliesInChild.compactMap { round.keys[$0] }),
                "the child's effects: \(beforeReopen.count) lines")

        // Reopen here: the runtime re-dispatches the stored tasks at open.
        let log = CrashRunLog()
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [CrashActivityJob.self],
                                        activities: [CrashEffect(effects: effects, log: log)])
        guard let results = try await jobResults(runtime, CrashActivityJob.self, count: count, log: log) else { return }
        defer { runtime.close() }

        // Every entity completed, with the key its activity first ran with.
        #expect(results.count == count)
        for index in 0..<count {
            #expect(results[index] == round.keys[index], "job-\(index): result \(results[index] ?? "-"), child's key \(round.keys[index] ?? "-")")
        }

        // What ran again: every activity whose completion was not committed — at least the 50 that never
        // returned — once each, with the same key; none whose completion the child saw committed.
        let reruns = log.all
        let rerun = Set(reruns.compactMap { Int($0.label) })
        #expect(reruns.count == rerun.count, "an activity ran twice after reopen: \(reruns.map(\.label))")
        #expect(odd.isSubset(of: rerun), "in flight at the kill but not run again: \(odd.subtracting(rerun).sorted())")
        #expect(rerun.isDisjoint(with: round.done.keys), "completed and committed, yet run again: \(rerun.intersection(round.done.keys).sorted())")
        for run in reruns {
            let index = Int(run.label) ?? -1
            #expect(run.key == round.keys[index], "job-\(index) ran again with key \(run.key), first with \(round.keys[index] ?? "-")")
            // One effect per activity: a re-run after an applied effect adds none, one before adds it.
            #expect(run.applied == !appliesInChild.contains(index), "job-\(index): re-run applied = \(run.applied)")
        }

        // The side-effect table, deduplicated by key, holds exactly one effect per activity; here every
        // key has exactly one line, the committed completions' included.
        let lines = effects.lines
        let keys = lines.map(CrashEffectsFile.key(of:))
        #expect(Set(keys) == Set(round.keys.values) && Set(keys).count == count, "\(Set(keys).count) distinct keys in the side-effect table")
        #expect(keys.count == count, "\(keys.count) lines for \(Set(keys).count) keys")
        for index in round.done.keys { #expect(keys.filter { $0 == round.keys[index] }.count == 1, "job-\(index)") }
        #expect(try storedTasks(runtime) == 0, "activity tasks left owed after every entity completed")
    }

    @Test("SIGKILLed after cancelling runs whose activities ignore the request (waitCancellationCompleted): after reopen every activity whose request was durable ends cancelled without running again, every other one runs again with its key, one effect per activity")
    func killedAfterActivityCancellations() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let count = 40
        // Killed after a random number of acknowledged cancellations: some requests durable, some
        // made but not acknowledged, some never made.
        let killAfter = Int.random(in: 1..<count)
        let (round, hung) = try await killChild(["cancel", directory.path]) { round in round.cancelAcked.count >= killAfter }
        try #require(!hung, "the child hung: \(round.applied.count) applied, \(round.cancelAcked.count) cancellations acknowledged")
        try #require(round.started == Set(0..<count) && round.applied == Set(0..<count),
                     "the child stopped early: \(round.started.count) started, \(round.applied.count) applied")
        #expect(round.attempts.values.allSatisfy { $0 == 1 }, "an activity ran twice in the child: \(round.attempts.filter { $0.value > 1 })")
        let effects = CrashEffectsFile(directory.path + "/effects.log")
        #expect(Set(effects.lines) == Set(round.keys.values) && effects.lines.count == count, "the child's effects: \(effects.lines.count) lines")

        let log = CrashRunLog()
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [CrashCancelJob.self],
                                        activities: [CrashStubborn(effects: effects, log: log)])
        guard let results = try await jobResults(runtime, CrashCancelJob.self, count: count, log: log) else { return }
        defer { runtime.close() }

        let reruns = Dictionary(log.all.map { (Int($0.label) ?? -1, [$0]) }, uniquingKeysWith: +)
        #expect(reruns.values.allSatisfy { $0.count == 1 }, "an activity ran twice after reopen: \(log.all.map(\.label))")
        var requested = 0
        for index in 0..<count {
            let kinds = try runtime.historyKinds(of: EntityName(type: CrashCancelJob.entityType, id: "job-\(index)"))
            let key = try #require(round.keys[index])
            if kinds.contains(.activityCancelRequested) {
                // The request was durable: the next open ended the activity as cancelled, unrun.
                requested += 1
                #expect(results[index]?.hasPrefix("cancelled:") == true, "job-\(index): \(results[index] ?? "-")")
                #expect(reruns[index] == nil, "job-\(index)'s activity ran again after its cancellation was durable")
                #expect(Array(kinds.drop { $0 != .cancelRequested }) == [.cancelRequested, .activityCancelRequested, .activityFailed, .completed])
            } else {
                #expect(!round.cancelAcked.contains(index), "job-\(index)'s cancellation was acknowledged but not recorded")
                #expect(results[index] == "done:" + key, "job-\(index): \(results[index] ?? "-")")
                #expect(reruns[index]?.first.map { $0.key == key && !$0.applied } == true,
                        "job-\(index) ran again with \(reruns[index].map { "\($0)" } ?? "nothing"), first with \(key)")
                #expect(!kinds.contains(.cancelRequested))
            }
        }
        #expect(requested >= killAfter)
        #expect(Set(effects.lines) == Set(round.keys.values) && effects.lines.count == count, "\(effects.lines.count) effects after reopen")
        #expect(try storedTasks(runtime) == 0, "activity tasks left owed after every entity completed")
        #expect(try runtime.journal.tasks(prefix: [ActivityTask.cancelKeyPrefix]).isEmpty, "cancellation rows left")
    }

    @Test("SIGKILLed with local activities done, in flight and inside an uncommitted turn: one effect per activity, same keys after reopen")
    func killedWithLocalActivities() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let count = 60
        let inline = Set((0..<count).filter { $0 % 3 == 0 })      // ended inside the start's turn
        let detached = Set((0..<count).filter { $0 % 3 != 0 })    // waiting at the kill: stored as tasks
        let appliesInChild = Set((0..<count).filter { $0 % 3 != 2 })
        let blocker = 1000                                        // applied its effect, its turn never committed

        let (round, hung) = try await killChild(["local", directory.path]) { round in
            round.started == Set(0..<count) && round.keys.count == count + 1 && round.applied == appliesInChild.union([blocker])
                && Set(round.done.keys) == inline
        }
        try #require(!hung, "the child hung: \(round.keys.count) running, \(round.applied.count) applied, \(round.done.count) done")
        try #require(round.applied.contains(blocker), "the child never blocked inside the blocker's turn")
        #expect(round.attempts.values.allSatisfy { $0 == 1 }, "an activity ran twice in the child: \(round.attempts.filter { $0.value > 1 })")
        #expect(!round.started.contains(blocker), "the blocker's start was acknowledged before its turn committed")
        for (index, key) in round.done { #expect(key == round.keys[index], "job-\(index) returned \(key), ran with \(round.keys[index] ?? "-")") }
        let blockerKey = try #require(round.keys[blocker])

        let effects = CrashEffectsFile(directory.path + "/effects.log")
        #expect(Set(effects.lines) == Set(appliesInChild.union([blocker]).compactMap { round.keys[$0] }),
                "the child's effects: \(effects.lines.count) lines")

        // Reopen here: the stored tasks of the attempts that were waiting run again, on the pool.
        let log = CrashRunLog()
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [CrashLocalJob.self],
                                        activities: [CrashEffect(effects: effects, log: log)])
        // The blocker's start was never acknowledged: its client sends it again, as clients do.
        let resend: @Sendable () async throws -> String = {
            let job = runtime.entity(CrashLocalJob.self, id: "blocker")
            try await job.start(blocker)
            return try await job.result()
        }
        guard let results = try await jobResults(runtime, CrashLocalJob.self, count: count, log: log, extra: [blocker: resend]) else { return }
        defer { runtime.close() }

        // Every entity completed with the key its activity first ran with, the blocker included (its
        // body ran again from the start and scheduled the same activity).
        for index in Array(0..<count) + [blocker] {
            #expect(results[index] == round.keys[index], "job-\(index): result \(results[index] ?? "-"), child's key \(round.keys[index] ?? "-")")
        }

        // What ran again: each attempt that was waiting at the kill and the blocker's, once each with
        // the same key; no inline attempt whose outcome was committed with the start.
        let reruns = log.all
        let rerun = Set(reruns.compactMap { Int($0.label) })
        #expect(reruns.count == rerun.count, "an activity ran twice after reopen: \(reruns.map(\.label))")
        #expect(rerun == detached.union([blocker]), "ran again: \(rerun.sorted())")
        for run in reruns {
            let index = Int(run.label) ?? -1
            #expect(run.key == round.keys[index], "\(index) ran again with key \(run.key), first with \(round.keys[index] ?? "-")")
            #expect(run.applied == !appliesInChild.union([blocker]).contains(index), "\(index): re-run applied = \(run.applied)")
        }
        #expect(reruns.first { $0.label == "\(blocker)" }?.key == blockerKey)

        // The side-effect table: exactly one line per activity.
        let keys = effects.lines.map(CrashEffectsFile.key(of:))
        #expect(keys.count == count + 1 && Set(keys) == Set(round.keys.values), "\(keys.count) lines, \(Set(keys).count) distinct keys")
        #expect(try storedTasks(runtime) == 0, "activity tasks left owed after every entity completed")
    }

    /// `heartbeat`: the activity SIGKILLs its process once its heartbeat is stored (which marks its
    /// attempt as started). `instant`: it records its start (`recordsAttemptStart`) and SIGKILLs its
    /// process as soon as it runs, having stored nothing itself.
    @Test("an activity that SIGKILLs its own process on every attempt ends after its 3 attempts, the run gets the failure: after a stored heartbeat (each attempt reads the one before's), or at once with its start recorded",
          arguments: ["heartbeat", "instant"])
    func crashLoopingActivityEnds(mode: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let instant = mode == "instant"
        for round in 1...3 {
            let child = try ChildProcess("EntityCrashChild", arguments: ["poison", directory.path, round == 1 ? "start" : "resume"]
                                            + (instant ? ["instant"] : []))
            let watchdog = EntityCrashTests.Watchdog(child)
            let lines = await child.remainingLines()
            #expect(!watchdog.disarm(), "round \(round): the child hung; it printed \(lines)")
            #expect(child.waitForExit(timeout: .seconds(60)))
            #expect(child.process.terminationReason == .uncaughtSignal && child.process.terminationStatus == SIGKILL,
                    "round \(round): the child ended otherwise (\(child.process.terminationStatus)); it printed \(lines)")
            // Attempt n in round n: no attempt ran twice. With heartbeats, it read attempt n-1's
            // stored details (none for the first).
            let attempts = lines.filter { $0.hasPrefix("attempt ") }
            #expect(attempts == [instant ? "attempt \(round)" : "attempt \(round) \(round - 1)"], "round \(round): \(lines)")
            #expect(instant || lines.contains("stored \(round)"), "round \(round): \(lines)")
        }
        let log = CrashRunLog()
        // Here only to notice an attempt after the last one allowed.
        let noteRun: @Sendable (ActivityContext) async throws -> String = { context in
            log.add(.init(label: "attempt \(context.attempt)", key: context.idempotencyKey, applied: false))
            return "ran"
        }
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [PoisonJob.self],
                                        activities: [Poison(noteRun), InstantPoison(noteRun)])
        defer { runtime.close() }
        let result = try await withDeadline(seconds: 240) { try await runtime.entity(PoisonJob.self, id: instant ? "q" : "p").result() }
        #expect(result == "failed:retriesExhausted:3:interrupted")
        #expect(log.all.isEmpty, "an attempt after the last one allowed: \(log.all.map(\.label))")
        // Recorded as ended by attempt 3, whose start this process did not see.
        let ended = try runtime.exportHistory(of: EntityName(type: PoisonJob.entityType, id: instant ? "q" : "p")).activities()
        #expect(ended.map(\.attempt) == [ActivityAttempt(number: 3, startedAt: nil)])
        #expect(try storedTasks(runtime) == 0)
    }

    @Test("a 3-step saga whose third step fails compensates steps 2 then 1, exactly once in effect, when SIGKILLed while compensating",
          arguments: ["UndoDeposit", "Refund"], ["before", "after"])
    func sagaKilledWhileCompensating(stall: String, when: String) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let order = ["Withdraw", "Deposit", "Record", "UndoDeposit", "Refund"]
        let stalledAt = order.firstIndex(of: stall)!

        // Kill once the child's `stall` compensation is in flight (before or after its effect).
        let child = try ChildProcess("EntityCrashChild", arguments: ["saga", directory.path, stall, when])
        let watchdog = EntityCrashTests.Watchdog(child)
        var runs: [(name: String, key: String)] = []
        var stalled = false
        func record(_ line: String) {
            let parts = line.split(separator: " ").map(String.init)
            if parts.count == 3, parts[0] == "running" { runs.append((parts[1], parts[2])) }
            if parts.count == 3, parts[0] == "stalled", parts[1] == stall { stalled = true }
        }
        while !stalled, let line = await child.readLine() { record(line) }
        let hung = watchdog.disarm()
        child.kill()
        for line in await child.remainingLines() { record(line) }
        try #require(!hung && stalled, "the child never reached \(stall): ran \(runs.map(\.name))")
        #expect(runs.map(\.name) == Array(order[...stalledAt]), "the child ran \(runs.map(\.name))")
        #expect(Set(runs.map(\.key)).count == runs.count, "two activities shared a key: \(runs.map(\.key))")
        let childKeys = Dictionary(uniqueKeysWithValues: runs.map { ($0.name, $0.key) })

        let effects = CrashEffectsFile(directory.path + "/effects.log")
        let appliedInChild = when == "after" ? Array(order[...stalledAt]) : Array(order[..<stalledAt])
        #expect(effects.lines.map { String($0.split(separator: " ")[0]) } == appliedInChild, "the child's effects: \(effects.lines)")

        // Reopen here, with the same activities minus the stall.
        let log = CrashRunLog()
        let runtime = try EntityRuntime(configuration: configuration(directory), entityTypes: [CrashTransfer.self], activities: [
            CrashSagaStep<CrashWithdrawStep>(effects: effects, log: log), CrashSagaStep<CrashDepositStep>(effects: effects, log: log),
            CrashSagaStep<CrashRecordStep>(effects: effects, log: log), CrashSagaStep<CrashUndoDepositStep>(effects: effects, log: log),
            CrashSagaStep<CrashRefundStep>(effects: effects, log: log),
        ])
        let result: String
        do {
            result = try await withDeadline(seconds: 240) { try await runtime.entity(CrashTransfer.self, id: "t-1").result() }
        } catch {
            let stored = try storedTasks(runtime)
            Issue.record("after reopen the saga did not finish (\(error)); ran \(log.all.map(\.label)), \(stored) tasks stored")
            return
        }
        defer { runtime.close() }
        #expect(result == "compensated after Record")

        // Only what had not completed ran again: the stalled compensation (same key), then what follows it.
        let reruns = log.all
        #expect(reruns.map(\.label) == Array(order[stalledAt...]), "ran after reopen: \(reruns.map(\.label))")
        if let first = reruns.first {
            #expect(first.key == childKeys[stall], "\(stall) ran again with key \(first.key), first with \(childKeys[stall] ?? "-")")
            #expect(first.applied == (when == "before"), "\(stall) re-run applied = \(first.applied)")
        }

        // The side-effect table, deduplicated by key: each step and each compensation once, the
        // compensations of steps 2 then 1 last.
        let lines = effects.lines
        var seen = Set<String>()
        let deduplicated = lines.filter { seen.insert(CrashEffectsFile.key(of: $0)).inserted }
        #expect(deduplicated.map { String($0.split(separator: " ")[0]) } == order, "effects: \(lines)")
        #expect(lines.count == order.count, "effects: \(lines)")
        for (name, key) in childKeys { #expect(lines.contains("\(name) \(key)"), "\(name)'s effect under its first key \(key)") }
        #expect(try storedTasks(runtime) == 0, "activity tasks left owed after the saga finished")
    }
}
