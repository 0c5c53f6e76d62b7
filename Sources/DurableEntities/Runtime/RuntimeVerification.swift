/// The runtime's rows in the journal's `tasks` table, for the integrity check.
extension EntityRuntime {
    /// The owner of a task the runtime stores: an activity task's entity (key `a` · entity · activity
    /// id) or an outbox message's sender (key `m` · sender · sequence · index). `nil` for other keys.
    public static let taskOwner: Journal.TaskOwner = { key in
        guard key.count >= 9 else { return nil }
        switch (key[0], key.count) {
        case (ActivityTask.keyPrefix, 17), (EntityEnvelope.keyPrefix, 21):
            return EntityKey(rawValue: key.loadUnaligned(fromByteOffset: 1, as: UInt64.self).bigEndian)
        default:
            return nil
        }
    }

    /// ``Journal/verify(directory:batchSize:reportLimit:acrossTables:taskOwner:)`` with the runtime's
    /// ``taskOwner``: a runtime's directory checked without opening it, its tasks included.
    public static func verify(directory: String, batchSize: Int = 10_000, reportLimit: Int = 1_000,
                              acrossTables: Bool = true) throws(JournalError) -> JournalVerification {
        try Journal.verify(directory: directory, batchSize: batchSize, reportLimit: reportLimit, acrossTables: acrossTables,
                           taskOwner: taskOwner)
    }
}
