/// What a run body asks of the runtime. Each command becomes one history event; on replay the commands
/// the code issues must match the recorded ones, in order.
enum WorkflowCommand: Sendable, Hashable, CustomStringConvertible {
    case startTimer(id: UInt64, due: UInt64)
    case cancelTimer(id: UInt64, due: UInt64)
    case sideEffect(id: UInt64, value: [UInt8])
    case marker(changeID: String, version: Int)
    case scheduleActivity(id: UInt64, name: String, input: [UInt8], options: ActivityOptions)
    case complete(output: [UInt8])
    /// Ends the run with a failure; `cancelled` when it ends a cancelled run (see
    /// ``WorkflowFailure/isCancellation``).
    case fail(message: String, cancelled: Bool)
    case startChild(id: UInt64, child: EntityName, input: [UInt8], policy: ParentClosePolicy)
    case signalEntity(id: UInt64, target: EntityName, signal: [UInt8])
    case cancelChild(id: UInt64)
    /// The body stopped awaiting activity `id` (the task awaiting it was cancelled).
    case cancelActivity(id: UInt64)
    /// Ends the run; the next one starts with this input (see ``WorkflowContext/continueAsNew(_:)``).
    case continueAsNew(input: [UInt8])

    /// Whether a recorded command and a new one are the same step of the code (ids and kinds; not
    /// values, which a replay takes from history).
    func matches(_ other: WorkflowCommand) -> Bool {
        switch (self, other) {
        case (.startTimer(let a, _), .startTimer(let b, _)): a == b
        case (.cancelTimer(let a, _), .cancelTimer(let b, _)): a == b
        case (.sideEffect(let a, _), .sideEffect(let b, _)): a == b
        case (.marker(let a, let x), .marker(let b, let y)): a == b && x == y
        case (.scheduleActivity(let a, let x, _, _), .scheduleActivity(let b, let y, _, _)): a == b && x == y
        case (.complete, .complete), (.fail, .fail), (.continueAsNew, .continueAsNew): true
        case (.startChild(let a, let x, _, _), .startChild(let b, let y, _, _)): a == b && x == y
        case (.signalEntity(let a, let x, _), .signalEntity(let b, let y, _)): a == b && x == y
        case (.cancelChild(let a), .cancelChild(let b)): a == b
        case (.cancelActivity(let a), .cancelActivity(let b)): a == b
        default: false
        }
    }

    var description: String {
        switch self {
        case .startTimer(let id, let due): "StartTimer(id: \(id), due: \(due))"
        case .cancelTimer(let id, _): "CancelTimer(id: \(id))"
        case .sideEffect(let id, let value): "SideEffect(id: \(id), \(value.count) bytes)"
        case .marker(let changeID, let version): "VersionMarker(\"\(changeID)\", version: \(version))"
        case .scheduleActivity(let id, let name, let input, _): "ScheduleActivity(id: \(id), \(name), \(input.count) bytes)"
        case .complete(let output): "Complete(\(output.count) bytes)"
        case .fail(let message, let cancelled): cancelled ? "Cancelled(\(message))" : "Fail(\(message))"
        case .startChild(let id, let child, let input, let policy): "StartChild(id: \(id), \(child), \(input.count) bytes, \(policy))"
        case .signalEntity(let id, let target, let signal): "SignalEntity(id: \(id), \(target), \(signal.count) bytes)"
        case .cancelChild(let id): "CancelChild(id: \(id))"
        case .cancelActivity(let id): "CancelActivity(id: \(id))"
        case .continueAsNew(let input): "ContinueAsNew(\(input.count) bytes)"
        }
    }
}
