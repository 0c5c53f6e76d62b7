import DurableEntities

extension Journal {
    /// Benchmark set-up: registers the entities `Account/<prefix>0` … `Account/<prefix><count - 1>`,
    /// 1,000 a commit, and returns their keys in that order.
    func registerAccounts(_ count: Int, prefix: String) async throws -> [EntityKey] {
        var keys: [EntityKey] = []
        keys.reserveCapacity(count)
        var index = 0
        while index < count {
            var batch = JournalBatch()
            let end = min(count, index + 1_000)
            for i in index..<end { batch.register(EntityName(type: "Account", id: "\(prefix)\(i)")) }
            keys += try await commit(batch).registered
            index = end
        }
        return keys
    }
}
