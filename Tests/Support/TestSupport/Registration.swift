import DurableEntities

extension Journal {
    /// Registers `name` one of the two ways a journal can: with a reserved key, in the batch of its
    /// first event `firstEvent` (the way entities register), or on its own with ``register(_:)``.
    public func register(_ name: EntityName, reservingKeyWithFirstEvent firstEvent: [UInt8]?) async throws -> EntityKey {
        guard let firstEvent else { return try await register(name) }
        let key = reserveNewKey()
        var batch = JournalBatch()
        batch.register(name, as: key)
        batch.append(key, sequence: 1, payload: firstEvent)
        _ = try await commit(batch)
        return key
    }
}
