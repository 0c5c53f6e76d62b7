/// The runtime's rows in the journal's `tasks` table, for the integrity check.
extension EntityRuntime {
    /// The owner of a task the runtime stores: an activity task's entity (key `a` · entity · activity
    /// id), an activity cancellation request's (key `c` · entity · activity id), an activity pause's
    /// (key `p` · entity · activity id) or an outbox message's sender (key `m` · sender · sequence · index). `nil` for other keys.
    public static let taskOwner: Journal.TaskOwner = { key in
        (ActivityTask.id(ofKey: key) ?? ActivityTask.id(ofCancelKey: key) ?? ActivityTask.id(ofPauseKey: key)).map { EntityKey(rawValue: $0.entityKey) }
            ?? EntityEnvelope.sender(ofKey: key)
    }

    /// ``Journal/verify(directory:batchSize:reportLimit:acrossTables:taskOwner:)`` with the runtime's
    /// ``taskOwner``: a runtime's directory checked without opening it, its tasks included.
    public static func verify(directory: String, batchSize: Int = 10_000, reportLimit: Int = 1_000,
                              acrossTables: Bool = true) throws(JournalError) -> JournalVerification {
        try Journal.verify(directory: directory, batchSize: batchSize, reportLimit: reportLimit, acrossTables: acrossTables,
                           taskOwner: taskOwner)
    }
}
