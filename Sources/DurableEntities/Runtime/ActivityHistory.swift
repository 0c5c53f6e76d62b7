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
        /// Its outcome: the encoded output, or the failure the run saw; `nil` while it is awaited.
        public var outcome: Result<[UInt8], ActivityFailure>?
        /// The sequence and time (ns) of its outcome event; `nil` while it is awaited.
        public var closedSequence: UInt64?
        public var closedAt: UInt64?

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
            default:
                continue
            }
        }
        return activities
    }
}
