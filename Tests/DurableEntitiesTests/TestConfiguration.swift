@testable import DurableEntities
import DurableEntitiesTesting

extension EntityRuntime.Configuration {
    /// The suites' usual start: `directory`, the test `clock`, and loggers that drop everything.
    static func quiet(_ directory: TemporaryDirectory, _ clock: TestClock) -> Self {
        var configuration = EntityRuntime.Configuration(directory: directory.path, clock: clock, logger: quietLogger)
        configuration.journal.logger = quietLogger
        return configuration
    }
}
