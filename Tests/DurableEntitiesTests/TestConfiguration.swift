@testable import DurableEntities
import DurableEntitiesTesting
import Testing

extension EntityRuntime.Configuration {
    /// The suites' usual start: `directory`, the test `clock`, and loggers that drop everything.
    static func quiet(_ directory: TemporaryDirectory, _ clock: TestClock) -> Self {
        var configuration = EntityRuntime.Configuration(directory: directory.path, clock: clock, logger: quietLogger)
        configuration.journal.logger = quietLogger
        return configuration
    }
}

extension EntityRuntime {
    /// The kinds of the events of `name`'s current run, as exported, in order.
    func historyKinds(of name: EntityName) throws -> [HistoryEvent.Kind] {
        try exportHistory(of: name).decodedEvents().map(\.event.kind)
    }

    /// Waits, off the cooperative pool, until the runtime has nothing in flight (turns, commits,
    /// activity attempts, outcomes and timers handed over).
    func untilIdle() async {
        _ = await Task.detached { self.core.waitUntilIdle() }.value
    }

    /// Moves `clock` by `duration`, then waits until the timer service has handed over every timer
    /// that fell due (it parked again after the move, nothing on its way) and the runtime is idle.
    /// (`untilIdle()` alone may look before the service has seen the move.)
    func advance(_ clock: TestClock, by duration: Duration) async {
        let timers = core.timers
        _ = await Task.detached {
            let before = timers.park(timeout: .seconds(60)) { _ in true }?.parkings ?? 0
            clock.advance(by: duration)
            _ = timers.park(timeout: .seconds(60)) { $0.parkings > before && $0.inFlight == 0 }
            self.core.waitUntilIdle()
        }.value
    }
}

extension EntityRef {
    /// The one activity the entity's run waits for, as ``EntityRuntime/describe(_:)`` tells it (an
    /// issue is recorded when it waits for none or for several).
    func onlyPendingActivity(sourceLocation: SourceLocation = #_sourceLocation) throws -> EntityDescription.PendingActivity {
        let description = try #require(try describe(), sourceLocation: sourceLocation)
        #expect(description.pendingActivities.count == 1, sourceLocation: sourceLocation)
        return try #require(description.pendingActivities.first, sourceLocation: sourceLocation)
    }
}
