import ArgumentParser
import DurableEntities

/// The data directory's integrity check: every row of every table of the journal read and checked,
/// then the tables checked against each other, the runtime's tasks included
/// (``EntityRuntime/verify(directory:batchSize:reportLimit:acrossTables:)``). It does not open the
/// journal, let alone the runtime: no entity resumes and no timer fires while it reads, nothing is
/// created or upgraded, and damage that makes an open fail is still listed. Exits with status 1
/// when a row is damaged or the tables disagree.
struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Checks every row of the data directory (checksums and shapes) and the tables against each other; exits 1 on damage or disagreement.")

    @OptionGroup var options: BankOptions

    @Option(name: .long, help: "How many damaged rows, and how many disagreements, to describe (all are counted).")
    var show: Int = 100

    @Flag(name: .long, help: "Check each row on its own only, not the tables against each other (no long read transaction).")
    var rowsOnly = false

    func run() async throws {
        let started = ContinuousClock.now
        let verification = try EntityRuntime.verify(directory: options.data, reportLimit: max(0, show), acrossTables: !rowsOnly)
        print("\(options.data): \(verification)")
        print("Read in \(milliseconds(ContinuousClock.now - started)).")
        if !verification.isIntact { throw ExitCode.failure }
    }
}
