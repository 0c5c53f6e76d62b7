import ArgumentParser
import DurableEntities
import Foundation
import Synchronization

/// The process the demo kills: deposits 1 cent at a time into `saver-1` … `saver-N`, one sender per
/// account, all in parallel, and prints a line for every acknowledged (durable) deposit:
///
///     ack <acknowledged so far> <account> <the sender's deposit number>
///
/// Deposit number `n` of a run uses the ref (and idempotency key) `<run>-<n>`, so whoever reads these
/// lines knows which deposit each sender had in flight when the process died: the one after its
/// last acknowledged. Hidden from `--help`; `demo` starts it.
struct DepositForever: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deposit-forever",
        abstract: "Deposits 1 cent at a time, printing each acknowledgement, until killed (used by `demo`).",
        shouldDisplay: false)

    @OptionGroup var options: BankOptions

    @Option(name: .long, help: "A name for this run, the prefix of every deposit's ref.")
    var run: String

    @Option(name: .long, help: "How many senders (and accounts) deposit in parallel.")
    var senders: Int = 4

    @Option(name: .long, help: "Each sender stops after this many deposits (a bound, in case nobody kills it).")
    var limit: Int = 100_000

    /// The saver accounts, `saver-1` … `saver-count`.
    static func accounts(_ count: Int) -> [String] { (1...max(1, count)).map { "saver-\($0)" } }

    /// The ref of a sender's `number`-th deposit in run `run`.
    static func ref(run: String, number: Int) -> String { "\(run)-\(number)" }

    func run() async throws {
        let runtime = try options.openRuntime()
        defer { runtime.close() }
        let acknowledgements = Acknowledgements()
        let run = self.run
        let limit = self.limit
        try await withThrowingTaskGroup(of: Void.self) { group in
            for id in Self.accounts(senders) {
                let account = runtime.entity(Account.self, id: id)
                group.addTask {
                    for number in 1...max(1, limit) {
                        try await account.deposit(cents: 1, ref: Self.ref(run: run, number: number))
                        acknowledgements.print(account: id, number: number)
                    }
                }
            }
            try await group.waitForAll()
        }
    }
}

/// Counts acknowledged deposits and prints one line for each, in count order.
///
/// Each line goes out in one `write(2)` to standard output, unbuffered and shorter than a pipe's
/// atomic-write size: a line the reader sees is a deposit the runtime acknowledged, and a SIGKILL
/// never leaves half a line behind.
final class Acknowledgements: Sendable {
    private let count = Mutex(0)

    func print(account: String, number: Int) {
        count.withLock { count in
            count += 1
            try? FileHandle.standardOutput.write(contentsOf: Data("ack \(count) \(account) \(number)\n".utf8))
        }
    }
}
