import Synchronization

/// Storage failures on purpose, for the tests of the paths that handle them: a commit or a read that
/// fails once and then works, as after a full disk that was freed or a read error that went away.
/// Everything else is real LMDB: a failed commit runs its transaction and aborts it, so nothing of it
/// is written and its callers get the `storage` error a real failure gives.
///
/// Set through ``Journal/Configuration/faults`` (internal: the test suites reach it with
/// `@testable import`). Costs one `nil` check per commit and per read when unset.
final class JournalFaults: Sendable {
    private struct Rule<Subject>: Sendable {
        var remaining: Int
        var matches: @Sendable (Subject) -> Bool
    }
    private struct State: Sendable {
        var commit: Rule<JournalBatch>?
        /// What a failing commit throws (``InjectedFault`` when `nil`).
        var commitError: (any Error & Sendable)?
        var read: Rule<String>?
        var commitsFailed = 0
        var readsFailed = 0
    }
    private let state = Mutex(State())

    init() {}

    /// The next `count` commits that carry a batch matching `matches` fail (the whole commit, as a
    /// real failure would: every batch in it).
    /// - Parameter error: what the commit fails with (an ``InjectedFault`` by default; an
    ///   `LMDBError` to act out a particular LMDB failure, such as MDB_PANIC).
    func failCommits(_ count: Int = 1, with error: (any Error & Sendable)? = nil,
                     where matches: @escaping @Sendable (JournalBatch) -> Bool = { _ in true }) {
        state.withLock {
            $0.commit = Rule(remaining: count, matches: matches)
            $0.commitError = error
        }
    }

    /// The next `count` reads whose description (as in the `storage` error's message, such as
    /// "reading the history of …") matches `matches` fail.
    func failReads(_ count: Int = 1, where matches: @escaping @Sendable (String) -> Bool = { _ in true }) {
        state.withLock { $0.read = Rule(remaining: count, matches: matches) }
    }

    /// How many commits and reads failed on purpose so far.
    var failed: (commits: Int, reads: Int) { state.withLock { ($0.commitsFailed, $0.readsFailed) } }

    /// What this commit of `batches` fails with, or `nil` if it does not fail (counted if it does).
    func commitFault(_ batches: some Sequence<JournalBatch>) -> (any Error)? {
        state.withLock { state in
            guard let rule = state.commit, rule.remaining > 0, batches.contains(where: rule.matches) else { return nil }
            state.commit!.remaining -= 1
            state.commitsFailed += 1
            return state.commitError ?? InjectedFault()
        }
    }

    /// Whether the read described by `description` fails (counted if so).
    func readFails(_ description: String) -> Bool {
        state.withLock { state in
            guard let rule = state.read, rule.remaining > 0, rule.matches(description) else { return false }
            state.read!.remaining -= 1
            state.readsFailed += 1
            return true
        }
    }
}

/// The error a failure on purpose throws inside the transaction or read.
struct InjectedFault: Error, CustomStringConvertible {
    var description: String { "a storage failure injected by the test (JournalFaults)" }
}
