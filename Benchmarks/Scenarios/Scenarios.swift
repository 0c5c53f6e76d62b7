/// The registry: every scenario `swift run -c release Benchmarks` knows, in the order they run
/// when none is named on the command line.
///
/// To add a scenario, write a type conforming to ``BenchmarkScenario`` (one per file in
/// `Benchmarks/Scenarios/`) and append `MyScenario.self` below. Names must be unique; the
/// harness checks at start-up.
enum Scenarios {
    static var all: [any BenchmarkScenario.Type] {
        [
            NoopScenario.self,
            JournalAppendScenario.self,
            JournalReadScenario.self,
            EntitySignalsScenario.self,
            EntityActivateScenario.self,
            ReplayScenario.self,
            EntityMemoryScenario.self,
            CodecScenario.self,
            SagaTransferScenario.self,
            FanoutScenario.self,
            TimersScenario.self,
            RecoveryScenario.self,
            VerifyScenario.self,
        ]
    }

    /// The scenario registered under `name`, if any.
    static func named(_ name: String) -> (any BenchmarkScenario.Type)? {
        all.first { $0.name == name }
    }
}
