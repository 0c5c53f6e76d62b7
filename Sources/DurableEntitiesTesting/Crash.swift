@_spi(Testing) import DurableEntities

extension EntityRuntime {
    /// Crashes the runtime (drops it without closing: what was not committed is lost, nothing
    /// acknowledged is) and opens a new one on the same directory, inside one test.
    ///
    /// ```swift
    /// let runtime = try EntityRuntime(configuration: configuration)
    /// try await runtime.entity(Account.self, id: "a").signal(.deposit(5))
    /// let reopened = try runtime.crashAndReopen(configuration: configuration)
    /// ```
    public func crashAndReopen(configuration: EntityRuntime.Configuration,
                               entityTypes: [any EntityWorkflow.Type] = []) throws(EntityError) -> EntityRuntime {
        simulateCrash()
        return try EntityRuntime(configuration: configuration, entityTypes: entityTypes)
    }
}
