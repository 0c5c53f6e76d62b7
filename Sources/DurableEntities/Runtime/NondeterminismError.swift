/// Replaying an entity's history through its current code issued other commands than the history
/// recorded: the code changed in a way that is not safe for runs already in flight. The history is
/// kept untouched and the entity is marked failed; guard the change with `context.version(…)`.
public struct NondeterminismError: Error, Sendable, CustomStringConvertible {
    /// The entity.
    public let entity: EntityName
    /// The sequence number of the recorded event that did not match.
    public let sequence: UInt64
    /// What history recorded at that point.
    public let recorded: String
    /// What the code issues now.
    public let issued: String

    public var description: String {
        """
        nondeterminism in \(entity) at event \(sequence):
          history recorded: \(recorded)
          the code issues:  \(issued)
        The code changed in a way that breaks runs already in flight; guard the change with \
        context.version("change-id", minSupported:maxSupported:).
        """
    }
}
