import Logging

/// Rebuilds an entity's state by running its history through its current code: handlers for signals
/// and updates and, for a run body, the body itself, matching each command it issues against the one
/// recorded. Activation uses it on the journal's events; ``ExportedHistory/replay(as:codec:)`` on an
/// exported history (to check new code against real histories before deploying it).
struct HistoryReplayer<W: EntityWorkflow> {
    let name: EntityName
    let codec: any EntityCodec
    let logger: Logger
    /// Handlers' requests during replay are ignored (the turn that made them already acted on them).
    private let requests = TurnRequests()

    init(name: EntityName, codec: any EntityCodec, logger: Logger) {
        self.name = name
        self.codec = codec
        self.logger = logger
    }

    /// Replays `events` (consecutive, from `durable.lastSequence + 1`) onto `durable`.
    func replay(_ events: [(UInt64, HistoryEvent)], into durable: inout EntityDurable) throws(EntityError) {
        var state = durable.state as! W.State
        defer { durable.state = state }
        if W.hasRunBody, events.contains(where: { $0.1.kind == .started }) {
            let run = WorkflowRun<W>(name: name, run: durable.run, state: state, codec: codec, logger: logger)
            for (_, event) in events {
                switch event.command {
                case .sideEffect(let id, let value)?: run.recordedSideEffects[id] = value
                case .marker(let changeID, let version)?: run.recordedVersions[changeID] = version
                default: break
                }
            }
            run.replaying = true
            durable.workflow = run
        }
        // Replaying stays on through the last event: code that runs after it was already run when
        // that event was first handled, and issued nothing then (or history would go on).
        for (sequence, event) in events {
            try replay(sequence, event, state: &state, into: &durable)
        }
        if let run = EntityCell<W>.run(durable) {
            run.replaying = false
            run.forgetReplayedCancelRequests()
            if let extra = run.issued.first {
                run.abandon()
                throw nondeterminism(at: durable.lastSequence + 1, recorded: "nothing (the history ends here)", issued: extra.description)
            }
        }
    }

    /// Replays one event of an entity type without a run body, reading it where it lies (the
    /// journal's page): the hot path of activation.
    func replayInPlace(_ sequence: UInt64, _ payload: UnsafeRawBufferPointer, state: inout W.State,
                       into durable: inout EntityDurable) throws(EntityError) {
        guard let header = HistoryEvent.Header(payload) else {
            throw EntityError(.failedOnReplay, entity: name, sequence: sequence, "the event is not a history event this runtime knows")
        }
        let body = UnsafeRawBufferPointer(rebasing: payload[header.bodyOffset...])
        durable.runBytes += payload.count
        durable.lastSequence = sequence
        let context = EntityContext(id: name.id, sequence: sequence, nowNanoseconds: header.timeNanoseconds, logger: logger,
                                    requests: requests)
        do {
            switch header.kind {
            case .signal:
                try W.handle(try codec.decode(W.Signal.self, from: body), state: &state, context: context)
            case .update:
                guard body.count >= 4 else { throw HistoryEventError.malformed }
                let length = Int(body.loadUnaligned(as: UInt32.self).bigEndian)
                guard 4 + length <= body.count else { throw HistoryEventError.malformed }
                let update = try codec.decode(W.Update.self, from: UnsafeRawBufferPointer(rebasing: body[4..<(4 + length)]))
                _ = try W.apply(update, state: &state, context: context)
            case .terminated:
                durable.status = .terminated
            case .parentLinked:
                break  // a child start this entity type refused (it has no run body)
            default:
                throw EntityError(.failedOnReplay, entity: name, sequence: sequence,
                                  "a \(header.kind) event in the history of an entity type without a run body")
            }
        } catch let error as EntityError {
            throw error
        } catch {
            throw EntityError(.failedOnReplay, entity: name, sequence: sequence,
                              "replaying the \(header.kind) event failed; the history is kept and the entity is marked failed. Fix the code (or its Codable types) and restart",
                              underlying: error)
        }
    }

    private func nondeterminism(at sequence: UInt64, recorded: String, issued: String) -> EntityError {
        let detail = NondeterminismError(entity: name, sequence: sequence, recorded: recorded, issued: issued)
        return EntityError(.nondeterminism, entity: name, sequence: sequence,
                           "replay diverged from history; the history is kept and the entity is marked failed", underlying: detail)
    }

    private func replay(_ sequence: UInt64, _ event: HistoryEvent, state: inout W.State,
                        into durable: inout EntityDurable) throws(EntityError) {
        let context = EntityContext(id: name.id, sequence: sequence, nowNanoseconds: event.timeNanoseconds, logger: logger,
                                    requests: requests)
        durable.runBytes += event.body.count
        durable.lastSequence = sequence
        if event.kind.isCommand {
            guard let recorded = event.command else {
                throw EntityError(.failedOnReplay, entity: name, sequence: sequence, "the \(event.kind) event is malformed")
            }
            guard let run = EntityCell<W>.run(durable) else {
                throw nondeterminism(at: sequence, recorded: recorded.description, issued: "nothing (no run body was started)")
            }
            guard let issued = run.issued.first else {
                if case .fail(let message, _) = recorded, run.continuation != nil {
                    run.refuseContinueAsNew(message)  // the turn refused this run's continue-as-new
                    run.issued.removeFirst()
                    return
                }
                run.abandon()
                throw nondeterminism(at: sequence, recorded: recorded.description, issued: "nothing")
            }
            guard issued.matches(recorded) else {
                run.abandon()
                throw nondeterminism(at: sequence, recorded: recorded.description, issued: issued.description)
            }
            if case .fail(let message, let cancelled) = recorded {
                run.replayedFailure(WorkflowFailure(message: message, isCancellation: cancelled))
            }
            run.issued.removeFirst()
            return
        }
        func settle(_ body: (WorkflowRun<W>) -> Void = { $0.settle() }) {
            guard let run = EntityCell<W>.run(durable) else { return }
            run.state = state
            run.now = event.timeNanoseconds
            body(run)
            state = run.state
        }
        do {
            switch event.kind {
            case .signal:
                let signal = try event.body.withUnsafeBytes { try codec.decode(W.Signal.self, from: $0) }
                try W.handle(signal, state: &state, context: context)
                settle()
            case .update:
                guard let parts = event.updateParts() else { throw HistoryEventError.malformed }
                let update = try parts.update.withUnsafeBytes { try codec.decode(W.Update.self, from: $0) }
                _ = try W.apply(update, state: &state, context: context)
                settle()
            case .terminated:
                durable.status = .terminated
            case .started:
                let input = try event.body.withUnsafeBytes { try codec.decode(W.Input.self, from: $0) }
                settle { $0.start(input) }
            case .timerFired:
                guard let id = event.firedTimer else { throw HistoryEventError.malformed }
                settle { _ = $0.fire(timer: id) }
            case .cancelRequested:
                settle { $0.cancel() }
            case .activityCompleted, .activityFailed, .activityCompletedWithoutAttempt, .activityFailedWithoutAttempt:
                guard let (id, outcome) = event.activityOutcome else { throw HistoryEventError.malformed }
                settle { $0.completeActivity(id, outcome) }
            case .childCompleted, .childFailed:
                guard let (id, outcome) = event.childOutcome else { throw HistoryEventError.malformed }
                settle { $0.completeChild(id, outcome) }
            case .parentLinked:
                guard let link = ParentLink.decode(event.body) else { throw HistoryEventError.malformed }
                durable.parents.append(link)
            default:
                break
            }
        } catch {
            durable.workflow?.abandon()
            throw EntityError(.failedOnReplay, entity: name, sequence: sequence,
                              "replaying the \(event.kind) event failed; the history is kept and the entity is marked failed. Fix the code (or its Codable types) and restart",
                              underlying: error)
        }
    }
}

/// An entity's current run, exported (as JSON through `Codable`) for replaying against other code:
/// golden histories in tests, or a check before deploying a change. See ``EntityRuntime/exportHistory(of:)``.
public struct ExportedHistory: Codable, Sendable, Hashable {
    public struct Event: Codable, Sendable, Hashable {
        public var sequence: UInt64
        public var kind: HistoryEvent.Kind
        public var timeNanoseconds: UInt64
        public var idempotencyKey: String?
        /// The event's body, base64.
        public var body: String
    }

    public var entityType: String
    public var entityID: String
    public var run: UInt64
    /// The state the run started from (the continue-as-new snapshot), base64; `nil` for the first run.
    public var startState: String?
    public var events: [Event]

    /// Replays the history through `W`'s current code.
    /// - Returns: the state at the end of the history.
    /// - Throws: ``EntityError`` `nondeterminism` (its `underlying` a ``NondeterminismError``) when the
    ///   code issues other commands than recorded; `failedOnReplay` when a handler or decoding fails.
    public func replay<W: EntityWorkflow>(as type: W.Type, codec: any EntityCodec = BinaryEntityCodec(),
                                          logger: Logger = Logger(label: "DurableEntities.replay")) throws(EntityError) -> W.State {
        let name = EntityName(type: entityType, id: entityID)
        func decode(_ base64: String, _ what: String) throws(EntityError) -> [UInt8] {
            guard let data = Base64.decode(base64) else {
                throw EntityError(.undecodablePayload, entity: name, "the exported \(what) is not base64")
            }
            return data
        }
        var state = W.initialState(id: entityID)
        if let startState {
            let bytes = try decode(startState, "start state")
            do { state = try bytes.withUnsafeBytes { try codec.decode(W.State.self, from: $0) } } catch {
                throw EntityError(.undecodablePayload, entity: name, "the exported start state does not decode", underlying: error)
            }
        }
        let events = try decodedEvents().map { ($0.sequence, $0.event) }
        let first = events.first?.0 ?? 1
        var durable = EntityDurable(state: state, key: nil, lastSequence: first - 1, snapshotSequence: 0, status: .active,
                                            run: run, runStartSequence: first)
        try HistoryReplayer<W>(name: name, codec: codec, logger: logger).replay(events, into: &durable)
        durable.workflow?.abandon()
        return durable.state as! W.State
    }
}

/// Base64 without Foundation's `Data` round trip in the hot path (exports are rare; this is plain).
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8]()
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var index = 0
        while index < bytes.count {
            let a = bytes[index], b = index + 1 < bytes.count ? bytes[index + 1] : 0, c = index + 2 < bytes.count ? bytes[index + 2] : 0
            out.append(alphabet[Int(a >> 2)])
            out.append(alphabet[Int((a & 0x03) << 4 | b >> 4)])
            out.append(index + 1 < bytes.count ? alphabet[Int((b & 0x0F) << 2 | c >> 6)] : UInt8(ascii: "="))
            out.append(index + 2 < bytes.count ? alphabet[Int(c & 0x3F)] : UInt8(ascii: "="))
            index += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: String) -> [UInt8]? {
        var lookup = [UInt8](repeating: 0xFF, count: 256)
        for (index, character) in alphabet.enumerated() { lookup[Int(character)] = UInt8(index) }
        let input = Array(text.utf8).filter { $0 != UInt8(ascii: "=") }
        var out = [UInt8]()
        var buffer: UInt32 = 0
        var bits = 0
        for character in input {
            let value = lookup[Int(character)]
            guard value != 0xFF else { return nil }
            buffer = buffer << 6 | UInt32(value)
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: buffer >> UInt32(bits)))
            }
        }
        return out
    }
}
