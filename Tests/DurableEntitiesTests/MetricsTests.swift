@testable import DurableEntities
import Foundation
import Metrics
import MetricsTestKit
import Testing

@Suite("Metrics")
struct MetricsTests {
    /// The process's metrics backend: bootstrapped once (swift-metrics allows one bootstrap), before
    /// this test makes its runtime. Other tests' runtimes record into it too, harmlessly.
    static let metrics: TestMetrics = {
        let metrics = TestMetrics()
        MetricsSystem.bootstrap(metrics)
        return metrics
    }()

    @Test("shards report turns, their messages and the ready queue; the journal its commits")
    func shardAndJournalMetrics() async throws {
        let metrics = Self.metrics
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var configuration = EntityRuntime.Configuration(directory: directory.path, shards: 1, logger: quietLogger)
        configuration.journal.logger = quietLogger
        let runtime = try EntityRuntime(configuration: configuration)
        defer { runtime.close() }
        for index in 0..<10 { try await runtime.entity(Account.self, id: "m-\(index)").signal(.deposit(1)) }
        let dimensions = [("shard", "0")]
        #expect(try metrics.expectTimer("durable_entities_turn_duration", dimensions).values.count >= 10)
        #expect(try metrics.expectRecorder("durable_entities_turn_messages", dimensions).values.allSatisfy { $0 >= 1 })
        #expect(try !metrics.expectGauge("durable_entities_shard_ready_entities", dimensions).values.isEmpty)
        #expect(metrics.counterTotal(label: "durable_entities_journal_commits") >= 10)
        #expect(try !metrics.expectRecorder("durable_entities_journal_commit_operations").values.isEmpty)
    }
}
