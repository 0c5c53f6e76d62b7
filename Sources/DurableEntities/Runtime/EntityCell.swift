import DequeModule
import Logging
import Synchronization

/// The runtime's in-memory side of one entity: its mailbox and its committed state.
///
/// Messages queue in the mailbox; the entity's shard runs *turns*. A turn works on a copy of the
/// committed state, applies up to `maxMessagesPerTurn` messages, and hands the resulting events to the
/// journal's group commit. Only when that commit is durable does the copy become the committed state
/// and are the senders acknowledged; if it fails, the senders get the error and the entity reloads from
/// its history. One turn per entity is in flight at a time, so history order is mailbox order; other
/// entities on the shard keep running meanwhile.
///
/// `@unchecked Sendable`: all mutable state is inside `cell` (a `Mutex`); `runTurn` runs on the shard's
/// thread only.
final class EntityCell<W: EntityWorkflow>: ShardWork, @unchecked Sendable {
    enum Message {
        case signal(W.Signal, bytes: [UInt8], key: String?, reply: @Sendable (Result<Void, EntityError>) -> Void)
        case update(W.Update, bytes: [UInt8], key: String?, reply: @Sendable (Result<W.UpdateResult, EntityError>) -> Void)
        case read(@Sendable (Result<W.State, EntityError>) -> Void)
        case terminate(reason: String, reply: @Sendable (Result<Void, EntityError>) -> Void)
    }

    enum Status: UInt8, Sendable {
        case active = 0
        case terminated = 1
    }

    /// What is durable about the entity, as of its last committed turn.
    struct Durable: Sendable {
        var state: W.State
        var key: EntityKey?
        var lastSequence: UInt64
        var snapshotSequence: UInt64
        var status: Status
        /// The current run and the sequence of its first event.
        var run: UInt64 = 1
        var runStartSequence: UInt64 = 1
        /// Bytes of events in the current run since activation (for the automatic continue-as-new).
        var runBytes = 0
    }

    struct State {
        var messages = Deque<Message>()
        var scheduled = false
        var inFlight = false
        var evicted = false
        /// `nil` until the entity is loaded, and again after a failed commit.
        var durable: Durable?
        var failure: EntityError?
    }

    let name: EntityName
    let core: RuntimeCore
    let shard: Shard
    let cell = Mutex(State())

    init(name: EntityName, core: RuntimeCore, shard: Shard) {
        self.name = name
        self.core = core
        self.shard = shard
    }

    // MARK: Any thread

    /// Queues a message. Returns `false` if the cell was passivated meanwhile (ask the runtime for the
    /// entity again).
    func enqueue(_ message: Message) -> Bool {
        let schedule = cell.withLock { state -> Bool? in
            guard !state.evicted else { return nil }
            state.messages.append(message)
            guard !state.scheduled, !state.inFlight else { return false }
            state.scheduled = true
            return true
        }
        guard let schedule else { return false }
        if schedule { shard.schedule(self) }
        return true
    }

    /// The committed state, if the entity is loaded and active (the fast path for queries).
    func committedState() -> W.State? {
        cell.withLock { state in
            guard let durable = state.durable, durable.status == .active, state.failure == nil else { return nil }
            return durable.state
        }
    }

    /// Marks the cell evicted if it is idle; returns whether it was.
    func evictIfIdle() -> Bool {
        cell.withLock { state in
            guard state.messages.isEmpty, !state.inFlight, !state.scheduled else { return false }
            state.evicted = true
            return true
        }
    }

    // MARK: The shard's thread

    func runTurn() {
        let (messages, durable, failure) = cell.withLock { state -> ([Message], Durable?, EntityError?) in
            state.scheduled = false
            guard !state.inFlight, !state.messages.isEmpty else { return ([], nil, nil) }
            let count = min(state.messages.count, core.configuration.maxMessagesPerTurn)
            var taken: [Message] = []
            taken.reserveCapacity(count)
            for _ in 0..<count { taken.append(state.messages.removeFirst()) }
            state.inFlight = true
            return (taken, state.durable, state.failure)
        }
        guard !messages.isEmpty else { return }
        if let failure {
            finishWithoutCommit(messages.map { Reply.fail($0, failure) })
            return
        }
        let current: Durable
        if let durable {
            current = durable
        } else {
            do {
                current = try load()
            } catch {
                cell.withLock { $0.failure = error }
                core.logger.error("entity failed to load", metadata: ["entity.type": "\(name.type)", "entity.id": "\(name.id)", "error": "\(error)"])
                finishWithoutCommit(messages.map { Reply.fail($0, error) })
                return
            }
            cell.withLock { $0.durable = current }
        }
        process(messages, from: current)
    }

    /// A reply held back until the turn's outcome is known.
    enum Reply: Sendable {
        case signal(@Sendable (Result<Void, EntityError>) -> Void)
        case update(@Sendable (Result<W.UpdateResult, EntityError>) -> Void, W.UpdateResult)
        case failed(@Sendable () -> Void)
        case done(@Sendable () -> Void)

        static func fail(_ message: Message, _ error: EntityError) -> Reply {
            switch message {
            case .signal(_, _, _, let reply): .failed { reply(.failure(error)) }
            case .update(_, _, _, let reply): .failed { reply(.failure(error)) }
            case .read(let reply): .failed { reply(.failure(error)) }
            case .terminate(_, let reply): .failed { reply(.failure(error)) }
            }
        }
    }

    private func process(_ messages: [Message], from start: Durable) {
        var next = start
        var pendingEvents: [(UInt64, [UInt8])] = []
        var replies: [Reply] = []
        replies.reserveCapacity(messages.count)
        var keysThisTurn: [String: [UInt8]] = [:]
        let now = core.clock.nowNanoseconds()
        let limit = core.configuration.maxPayloadBytes

        func record(_ event: HistoryEvent) -> UInt64 {
            next.lastSequence += 1
            let encoded = event.encoded()
            next.runBytes += encoded.count
            pendingEvents.append((next.lastSequence, encoded))
            return next.lastSequence
        }
        let requests = TurnRequests()
        func context(_ sequence: UInt64) -> EntityContext {
            EntityContext(id: name.id, sequence: sequence, nowNanoseconds: now, logger: core.logger, requests: requests)
        }

        for message in messages {
            if next.status == .terminated {
                replies.append(.fail(message, EntityError(.terminated, entity: name, "the entity was terminated; it accepts no more messages")))
                continue
            }
            switch message {
            case .read(let reply):
                let state = start.state
                replies.append(.done { reply(.success(state)) })
            case .signal(let signal, let bytes, let key, let reply):
                if bytes.count > limit {
                    replies.append(.failed { reply(.failure(EntityError(.payloadTooLarge, entity: self.name, "the signal has \(bytes.count) bytes, more than the limit of \(limit)"))) })
                    continue
                }
                if let key, (keysThisTurn[key] != nil || core.recorded(key, for: next.key) != nil) {
                    replies.append(.done { reply(.success(())) })  // a retry of a delivered signal
                    continue
                }
                var state = next.state
                do {
                    try W.handle(signal, state: &state, context: context(next.lastSequence + 1))
                } catch {
                    replies.append(.failed { reply(.failure(EntityError(.rejected, entity: self.name, "the signal handler refused the signal; nothing was recorded", underlying: error))) })
                    continue
                }
                next.state = state
                _ = record(HistoryEvent(kind: .signal, timeNanoseconds: now, idempotencyKey: key, body: bytes))
                if let key { keysThisTurn[key] = [] }
                replies.append(.signal(reply))
            case .update(let update, let bytes, let key, let reply):
                if bytes.count > limit {
                    replies.append(.failed { reply(.failure(EntityError(.payloadTooLarge, entity: self.name, "the update has \(bytes.count) bytes, more than the limit of \(limit)"))) })
                    continue
                }
                if let key, let recorded = keysThisTurn[key] ?? core.recorded(key, for: next.key) {
                    let decoded = Result { try recorded.withUnsafeBytes { try core.codec.decode(W.UpdateResult.self, from: $0) } }
                        .mapError { EntityError(.undecodablePayload, entity: self.name, "the recorded result of update '\(key)' does not decode", underlying: $0) }
                    replies.append(.done { reply(decoded) })
                    continue
                }
                var state = next.state
                let result: W.UpdateResult
                let resultBytes: [UInt8]
                do {
                    try W.validate(update, state: state)
                    result = try W.apply(update, state: &state, context: context(next.lastSequence + 1))
                } catch {
                    replies.append(.failed { reply(.failure(EntityError(.rejected, entity: self.name, "the update was refused; nothing was recorded", underlying: error))) })
                    continue
                }
                do {
                    resultBytes = try core.codec.encode(result)
                } catch {
                    replies.append(.failed { reply(.failure(EntityError(.unencodablePayload, entity: self.name, "the update's result does not encode; nothing was recorded", underlying: error))) })
                    continue
                }
                next.state = state
                _ = record(.update(time: now, key: key, update: bytes, result: resultBytes))
                if let key { keysThisTurn[key] = resultBytes }
                replies.append(.update(reply, result))
            case .terminate(let reason, let reply):
                next.status = .terminated
                _ = record(HistoryEvent(kind: .terminated, timeNanoseconds: now, body: Array(reason.utf8)))
                replies.append(.signal(reply))
            }
        }

        guard !pendingEvents.isEmpty else {
            finishWithoutCommit(replies)
            return
        }
        let configuration = core.configuration
        let continueAsNew = requests.continueAsNew
            || next.lastSequence + 1 - next.runStartSequence >= UInt64(configuration.continueAsNewAfterEvents)
            || next.runBytes >= configuration.continueAsNewAfterBytes
        commit(pendingEvents, keys: keysThisTurn, next: next, continueAsNew: continueAsNew && next.status == .active,
               replies: replies, into: JournalBatch())
    }

    /// Writes the turn's events (registering the entity first if it is new), then completes the turn.
    private func commit(_ events: [(UInt64, [UInt8])], keys: [String: [UInt8]], next: Durable, continueAsNew: Bool,
                        replies: [Reply], into batch: JournalBatch) {
        guard let key = next.key else {
            var registration = JournalBatch()
            registration.register(name)
            core.journal.submit(registration) { result in
                switch result {
                case .success(let receipt):
                    var registered = next
                    registered.key = receipt.registered[0]
                    self.commit(events, keys: keys, next: registered, continueAsNew: continueAsNew, replies: replies, into: batch)
                case .failure(let error):
                    self.complete(.failure(EntityError(.storage, entity: self.name, "registering the entity failed; nothing was recorded", underlying: error)), next: next, replies: replies)
                }
            }
            return
        }
        var batch = batch
        for (sequence, payload) in events { batch.append(key, sequence: sequence, payload: payload) }
        for (idempotencyKey, result) in keys { batch.recordResult(forKey: RuntimeCore.resultKey(idempotencyKey, key), payload: result) }
        var committed = next
        let snapshotDue = next.lastSequence - next.snapshotSequence >= UInt64(core.configuration.snapshotEvery)
        if snapshotDue || continueAsNew, let snapshot = try? core.codec.encode(next.state) {
            batch.saveSnapshot(key, sequence: next.lastSequence, payload: snapshot)
            committed.snapshotSequence = next.lastSequence
            if continueAsNew {
                // The new run starts from this snapshot, in the same commit as the turn: nothing that
                // arrives later can land in the old run, and nothing of the turn can be lost.
                let retention = core.configuration.keepRuns
                committed.run += 1
                committed.runBytes = 0
                committed.runStartSequence = next.lastSequence + 1
                if retention == 0 {
                    batch.deleteHistory(of: key, before: committed.runStartSequence)
                } else if retention == 1 {
                    batch.deleteHistory(of: key, before: next.runStartSequence)
                }
            }
        }
        if next.status == .terminated || committed.run != next.run {
            batch.setMetadata(key, EntityMetadata(name: name, status: committed.status.rawValue, run: committed.run,
                                                  runStartSequence: committed.runStartSequence))
        }
        let published = committed
        core.journal.submit(batch) { result in
            self.complete(result.map { _ in () }.mapError {
                EntityError(.storage, entity: self.name, "committing the turn failed; nothing of it was recorded", underlying: $0)
            }, next: published, replies: replies)
        }
    }

    /// Publishes a committed turn (or drops the entity's state after a failed one), then replies.
    private func complete(_ outcome: Result<Void, EntityError>, next: Durable, replies: [Reply]) {
        let reschedule = cell.withLock { state -> Bool in
            switch outcome {
            case .success: state.durable = next
            case .failure: state.durable = nil  // reload from history on the next turn
            }
            state.inFlight = false
            guard !state.messages.isEmpty, !state.scheduled else { return false }
            state.scheduled = true
            return true
        }
        if reschedule { shard.schedule(self) }
        for reply in replies {
            switch (reply, outcome) {
            case (.signal(let reply), .success): reply(.success(()))
            case (.signal(let reply), .failure(let error)): reply(.failure(error))
            case (.update(let reply, let result), .success): reply(.success(result))
            case (.update(let reply, _), .failure(let error)): reply(.failure(error))
            case (.failed(let reply), _), (.done(let reply), _): reply()
            }
        }
    }

    private func finishWithoutCommit(_ replies: [Reply]) {
        let reschedule = cell.withLock { state -> Bool in
            state.inFlight = false
            guard !state.messages.isEmpty, !state.scheduled else { return false }
            state.scheduled = true
            return true
        }
        if reschedule { shard.schedule(self) }
        for reply in replies {
            switch reply {
            case .failed(let reply), .done(let reply): reply()
            case .signal(let reply): reply(.success(()))
            case .update(let reply, let result): reply(.success(result))
            }
        }
    }

    // MARK: Activation

    /// Rebuilds the entity from its latest snapshot and the events after it, through the same handlers.
    private func load() throws(EntityError) -> Durable {
        let journal = core.journal
        let key: EntityKey?
        do { key = try journal.key(for: name) } catch {
            throw EntityError(.storage, entity: name, "looking up the entity failed", underlying: error)
        }
        guard let key else {
            return Durable(state: W.initialState(id: name.id), key: nil, lastSequence: 0, snapshotSequence: 0, status: .active)
        }
        var durable = Durable(state: W.initialState(id: name.id), key: key, lastSequence: 0, snapshotSequence: 0, status: .active)
        do {
            if let metadata = try journal.metadata(of: key) {
                if metadata.status == Status.terminated.rawValue { durable.status = .terminated }
                durable.run = metadata.run
                durable.runStartSequence = metadata.runStartSequence
            }
            if let snapshot = try journal.snapshot(of: key) {
                durable.state = try snapshot.payload.withUnsafeBytes { try core.codec.decode(W.State.self, from: $0) }
                durable.lastSequence = snapshot.sequence
                durable.snapshotSequence = snapshot.sequence
            }
        } catch let error as EntityError {
            throw error
        } catch {
            throw EntityError(.failedOnReplay, entity: name, sequence: durable.snapshotSequence,
                              "the entity's snapshot or metadata cannot be read", underlying: error)
        }
        var replayError: EntityError?
        do {
            try journal.forEachEvent(of: key, from: durable.lastSequence + 1) { sequence, payload in
                do throws(EntityError) {
                    try replay(sequence, payload, into: &durable)
                } catch {
                    replayError = error
                    throw error
                }
            }
        } catch {
            throw replayError ?? EntityError(.failedOnReplay, entity: name, "reading the entity's history failed", underlying: error)
        }
        return durable
    }

    private func replay(_ sequence: UInt64, _ payload: UnsafeRawBufferPointer, into durable: inout Durable) throws(EntityError) {
        guard let event = HistoryEvent.decode(payload) else {
            throw EntityError(.failedOnReplay, entity: name, sequence: sequence, "the event is not a history event this runtime knows")
        }
        let context = EntityContext(id: name.id, sequence: sequence, nowNanoseconds: event.timeNanoseconds, logger: core.logger,
                                    requests: TurnRequests())
        durable.runBytes += payload.count
        do {
            switch event.kind {
            case .signal:
                let signal = try event.body.withUnsafeBytes { try core.codec.decode(W.Signal.self, from: $0) }
                try W.handle(signal, state: &durable.state, context: context)
            case .update:
                guard let parts = event.updateParts() else { throw HistoryEventError.malformed }
                let update = try parts.update.withUnsafeBytes { try core.codec.decode(W.Update.self, from: $0) }
                _ = try W.apply(update, state: &durable.state, context: context)
            case .terminated:
                durable.status = .terminated
            }
        } catch {
            throw EntityError(.failedOnReplay, entity: name, sequence: sequence,
                              "replaying the \(event.kind) event failed; the history is kept and the entity is marked failed. Fix the code (or its Codable types) and restart",
                              underlying: error)
        }
        durable.lastSequence = sequence
    }
}

enum HistoryEventError: Error {
    case malformed
}
