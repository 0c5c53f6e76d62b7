/// An exported run's activities, read from its events: what a test or an operator asks of a history
/// ("was the charge scheduled, which attempt ended it, what did it return?") without decoding bytes.
extension ExportedHistory {
    /// One activity of the run: its `activityScheduled` event, and the outcome event that ended it
    /// with the attempt that ended it (its "started" record; failed attempts before that one are not
    /// events, see ``ActivityAttempt``).
    public struct Activity: Sendable, Hashable {
        /// The activity's command id in the run.
        public var id: UInt64
        /// The activity's registered name.
        public var name: String
        /// Its encoded input.
        public var input: [UInt8]
        public var options: ActivityOptions
        /// The sequence and time (ns) of its `activityScheduled` event.
        public var scheduledSequence: UInt64
        public var scheduledAt: UInt64
        /// The attempt that ended it; `nil` while it is awaited, or when its outcome was written by a
        /// version that did not record the attempt.
        public var attempt: ActivityAttempt?
        /// Its outcome: the encoded output, or the failure the run saw (reason `cancelled` for one
        /// the run stopped awaiting); `nil` while it is awaited.
        public var outcome: Result<[UInt8], ActivityFailure>?
        /// The sequence and time (ns) of its outcome event (or of its `activityCancelRequested`, unless
        /// its cancellation type is ``ActivityCancellationType/waitCancellationCompleted``); `nil`
        /// while it is awaited.
        public var closedSequence: UInt64?
        public var closedAt: UInt64?
        /// Whether the task that awaited it, or the run, was cancelled (`activityCancelRequested`). With
        /// ``ActivityCancellationType/tryCancel`` no attempt started after that and no outcome was
        /// recorded; with ``ActivityCancellationType/abandon`` its attempts went on and their outcome was
        /// dropped; with ``ActivityCancellationType/waitCancellationCompleted`` the outcome event that
        /// follows says how it ended.
        public var cancelRequested = false

        /// Its output decoded as `Output` (with the codec the runtime used, the binary codec unless
        /// configured otherwise); `nil` unless it completed.
        public func output<Output: Decodable>(as type: Output.Type, codec: any EntityCodec = BinaryEntityCodec()) throws -> Output? {
            guard case .success(let bytes) = outcome else { return nil }
            return try bytes.withUnsafeBytes { try codec.decode(Output.self, from: $0) }
        }
    }

    /// Each event as the journal stored it (its body decoded from base64).
    /// - Throws: ``EntityError`` `undecodablePayload` for a body that is not base64.
    public func decodedEvents() throws(EntityError) -> [(sequence: UInt64, event: HistoryEvent)] {
        var decoded: [(sequence: UInt64, event: HistoryEvent)] = []
        decoded.reserveCapacity(events.count)
        for event in events {
            guard let body = Base64.decode(event.body) else {
                throw EntityError(.undecodablePayload, entity: EntityName(type: entityType, id: entityID), sequence: event.sequence,
                                  "the exported event's body is not base64")
            }
            decoded.append((event.sequence, HistoryEvent(kind: event.kind, timeNanoseconds: event.timeNanoseconds,
                                                         idempotencyKey: event.idempotencyKey, body: body)))
        }
        return decoded
    }

    /// The run's activities, in the order it scheduled them, each with its outcome once recorded.
    /// - Throws: ``EntityError`` `undecodablePayload` for a body that is not base64, or an activity
    ///   event whose body does not parse.
    public func activities() throws(EntityError) -> [Activity] {
        var activities: [Activity] = []
        var index: [UInt64: Int] = [:]
        let name = EntityName(type: entityType, id: entityID)
        for (sequence, event) in try decodedEvents() {
            switch event.kind {
            case .activityScheduled:
                guard case .scheduleActivity(let id, let activity, let input, let options)? = event.command else {
                    throw EntityError(.undecodablePayload, entity: name, sequence: sequence, "the activityScheduled event does not parse")
                }
                index[id] = activities.count
                activities.append(Activity(id: id, name: activity, input: input, options: options, scheduledSequence: sequence,
                                           scheduledAt: event.timeNanoseconds))
            case .activityCompleted, .activityFailed, .activityCompletedWithoutAttempt, .activityFailedWithoutAttempt:
                guard let (id, outcome) = event.activityOutcome else {
                    throw EntityError(.undecodablePayload, entity: name, sequence: sequence, "the \(event.kind) event does not parse")
                }
                // An outcome of an activity scheduled before the export's first event (a pruned history) is left out.
                guard let position = index[id] else { continue }
                activities[position].attempt = event.activityAttempt
                activities[position].outcome = outcome
                activities[position].closedSequence = sequence
                activities[position].closedAt = event.timeNanoseconds
            case .activityCancelRequested:
                guard case .cancelActivity(let id)? = event.command, let position = index[id] else { continue }
                activities[position].cancelRequested = true
                let name = activities[position].name
                switch activities[position].options.cancellationType {
                case .waitCancellationCompleted: continue  // awaited until its outcome event
                case .tryCancel: activities[position].outcome = .failure(.waitCancelled(name))
                case .abandon: activities[position].outcome = .failure(.waitAbandoned(name))
                }
                activities[position].closedSequence = sequence
                activities[position].closedAt = event.timeNanoseconds
            default:
                continue
            }
        }
        return activities
    }
}

extension ExportedHistory {
    /// One child entity the run started: its `childStarted` event and, once recorded, its outcome.
    public struct Child: Sendable, Hashable {
        /// The start's command id in the run.
        public var id: UInt64
        public var name: EntityName
        /// The child's encoded input.
        public var input: [UInt8]
        public var policy: ParentClosePolicy
        /// The sequence and time (ns) of its `childStarted` event.
        public var startedSequence: UInt64
        public var startedAt: UInt64
        /// Whether the run asked it to cancel (`childCancelRequested`).
        public var cancelRequested = false
        /// Its outcome: the encoded output, or its failure; `nil` while it is awaited.
        public var outcome: Result<[UInt8], ChildFailure>?
        /// The sequence and time (ns) of its outcome event; `nil` while it is awaited.
        public var closedSequence: UInt64?
        public var closedAt: UInt64?
    }

    /// The child entities the run started, in the order it started them, each with its outcome once
    /// recorded (a fan-out's progress at a glance).
    /// - Throws: ``EntityError`` `undecodablePayload` for a body that is not base64, or a child event
    ///   whose body does not parse.
    public func children() throws(EntityError) -> [Child] {
        var children: [Child] = []
        var index: [UInt64: Int] = [:]
        let name = EntityName(type: entityType, id: entityID)
        for (sequence, event) in try decodedEvents() {
            switch event.kind {
            case .childStarted:
                guard case .startChild(let id, let child, let input, let policy)? = event.command else {
                    throw EntityError(.undecodablePayload, entity: name, sequence: sequence, "the childStarted event does not parse")
                }
                index[id] = children.count
                children.append(Child(id: id, name: child, input: input, policy: policy, startedSequence: sequence,
                                      startedAt: event.timeNanoseconds))
            case .childCancelRequested:
                if case .cancelChild(let id)? = event.command, let position = index[id] { children[position].cancelRequested = true }
            case .childCompleted, .childFailed:
                guard let (id, outcome) = event.childOutcome else {
                    throw EntityError(.undecodablePayload, entity: name, sequence: sequence, "the \(event.kind) event does not parse")
                }
                guard let position = index[id] else { continue }  // started before the export's first event
                children[position].outcome = outcome
                children[position].closedSequence = sequence
                children[position].closedAt = event.timeNanoseconds
            default:
                continue
            }
        }
        return children
    }
}

/// A one-line account of an event for people: its kind and what its body says, without decoding
/// the entity type's own payloads (signals, updates, inputs, outputs are given by size).
extension HistoryEvent: CustomStringConvertible {
    public var description: String {
        let key = idempotencyKey.map { ", key \($0)" } ?? ""
        if kind.isCommand, let command {
            return command.description + key
        }
        switch kind {
        case .activityCompleted, .activityFailed, .activityCompletedWithoutAttempt, .activityFailedWithoutAttempt:
            guard let (id, outcome) = activityOutcome else { break }
            let attempt = activityAttempt.map { ", \($0)" } ?? ""
            switch outcome {
            case .success(let output): return "ActivityCompleted(id: \(id)\(attempt), \(output.count) bytes)"
            case .failure(let failure): return "ActivityFailed(id: \(id)\(attempt), \(failure.reason), \(failure.attempts) attempts: \(failure.causeType))"
            }
        case .childCompleted, .childFailed:
            guard let (id, outcome) = childOutcome else { break }
            switch outcome {
            case .success(let output): return "ChildCompleted(id: \(id), \(output.count) bytes)"
            case .failure(let failure): return "ChildFailed(id: \(id), \(failure))"
            }
        case .timerFired:
            guard let id = firedTimer else { break }
            return "TimerFired(id: \(id))"
        case .terminated:
            return "Terminated(\(String(decoding: body, as: UTF8.self)))"
        case .parentLinked:
            guard let link = ParentLink.decode(body) else { break }
            return "ParentLinked(\(link.parent), id: \(link.commandID))"
        default:
            break
        }
        let name = String(describing: kind)
        return name.prefix(1).uppercased() + name.dropFirst() + "(\(body.count) bytes\(key))"
    }
}

extension ExportedHistory: CustomStringConvertible {
    /// The run, one event a line: sequence, time (ns), event.
    public var description: String {
        var lines = ["\(entityType)/\(entityID), run \(run)\(startState == nil ? "" : ", from a continue-as-new snapshot")"]
        guard let events = try? decodedEvents() else { return lines[0] + ": an event's body is not base64" }
        for (sequence, event) in events { lines.append("\(sequence)  \(event.timeNanoseconds)  \(event)") }
        return lines.joined(separator: "\n")
    }
}
