import Foundation
import Synchronization
import Logging
import Metrics

/// Fires durable timers: one thread sleeps until the earliest due timer (on the runtime's clock), then
/// hands every due timer to its entity as a message. The entity records the firing and deletes the
/// timer row in one commit, so a timer fires at least once and takes effect once; a timer that fell
/// due while the process was down fires right after the runtime opens. A timer whose row fails its
/// check is never fired: its owner stores it again (see ``deliver(_:)``).
///
/// `@unchecked Sendable`: its state is guarded by `condition`.
final class TimerService: @unchecked Sendable {
    /// Set once by ``start(core:)``, before the thread starts.
    private unowned(unsafe) var core: RuntimeCore!
    private let condition = NSCondition()
    private var woken = false
    private var stopping = false
    private var stopped = false
    /// Timers handed to their entity and not yet confirmed.
    private var delivering: Set<TimerID> = []
    /// Due timers whose entity type was not registered when they fell due.
    private var undelivered: Set<TimerID> = []
    /// Timers whose row failed its check and that no entity claimed: set aside (and reported) once,
    /// until the next open.
    private var damaged: Set<TimerID> = []
    /// The most timers on their way at once since the service started (waiting ones not counted).
    var mostInFlight: Int { condition.withLock { mostInFlightValue } }
    private var mostInFlightValue = 0
    /// Timers on their way now (the condition's lock held).
    private var inFlight: Int { delivering.count - undelivered.count - damaged.count }
    /// While the loop waits, the timers that were on their way when it began to (for tests: see
    /// ``park(timeout:where:)``). A condition of its own: a waiter on `condition` could take the
    /// loop's wake-up signal.
    private let parks = NSCondition()
    private var parkedInFlight: Int? = nil
    /// How many times the loop went to wait (under `parks`).
    private var parkings = 0
    /// Timers handed over (to their entity, or to the activity worker for a retry) since the start.
    private let handedOver = Atomic<Int>(0)
    /// Timers handed over since the service started (for tests).
    var deliveries: Int { handedOver.load(ordering: .acquiring) }
    /// The same count as a metric, `durable_entities_timers_fired`, with the dimension `kind`: `entity`
    /// (a run body's timer, or a condition's timeout) or `retry` (an activity's next attempt). A timer
    /// whose hand-over has to wait (its entity type not registered yet, a failed read) counts again
    /// when it is tried again.
    private let fired: (entity: Counter, retry: Counter)
    /// `durable_entities_timer_lag`: how late a timer was handed over, from its due time (runtime
    /// clock). A backlog after a long downtime, or a loop that falls behind, shows here.
    private let lag: Metrics.Timer

    /// - Parameter metricsDimensions: added to each of its metrics (``EntityRuntime/Configuration/metricsDimensions``).
    init(metricsDimensions: [(String, String)] = []) {
        fired = (entity: Counter(label: "durable_entities_timers_fired", dimensions: [("kind", "entity")] + metricsDimensions),
                 retry: Counter(label: "durable_entities_timers_fired", dimensions: [("kind", "retry")] + metricsDimensions))
        lag = Metrics.Timer(label: "durable_entities_timer_lag", dimensions: metricsDimensions)
    }

    /// An entity type was registered: timers that waited for one are looked at again.
    func retryUndelivered() {
        condition.lock()
        delivering.subtract(undelivered)
        undelivered.removeAll()
        woken = true
        condition.signal()
        condition.unlock()
    }
    /// In-memory alarms on the runtime's clock (activity timeouts): not durable, as the attempts they
    /// watch do not outlive the process either.
    private var alarms: [UInt64: (deadline: UInt64, action: @Sendable () -> Void)] = [:]
    private var nextAlarm: UInt64 = 1

    /// Calls `action` once the runtime's clock reaches `deadline`. Returns an id for ``cancelAlarm(_:)``.
    func alarm(at deadline: UInt64, _ action: @escaping @Sendable () -> Void) -> UInt64 {
        condition.lock()
        let id = nextAlarm
        nextAlarm += 1
        alarms[id] = (deadline, action)
        woken = true
        condition.signal()
        condition.unlock()
        return id
    }

    func cancelAlarm(_ id: UInt64) {
        condition.lock()
        alarms[id] = nil
        condition.unlock()
    }

    struct TimerID: Hashable {
        let entity: EntityKey
        let id: UInt64
    }

    /// The most timers on their way to their entities at once (those waiting for a registration not
    /// counted).
    static let maxInFlight = 1_024

    func start(core: RuntimeCore) {
        self.core = core
        core.clock.observe { [weak self] in self?.wake() }
        let thread = Thread { [self] in self.loop() }
        thread.start()
    }

    /// Looks at the timers again (a new one was committed, the clock moved, the runtime went idle).
    func wake() {
        condition.lock()
        woken = true
        condition.signal()
        condition.unlock()
    }

    func stop() {
        condition.lock()
        stopping = true
        condition.signal()
        while !stopped { condition.wait() }
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            if stopping {
                stopped = true
                condition.broadcast()
                condition.unlock()
                return
            }
            woken = false
            condition.unlock()

            let now = core.clock.nowNanoseconds()
            condition.lock()
            let ringing = alarms.filter { $0.value.deadline <= now }
            for id in ringing.keys { alarms[id] = nil }
            let nextAlarmDeadline = alarms.values.map(\.deadline).min()
            condition.unlock()
            for alarm in ringing.values { alarm.action() }
            // Due timers not handed over yet, as many as there is room for: those being delivered or
            // waiting for their type's registration are passed over, so however many of them come
            // first, the ones after them still fire; and at most `maxInFlight` are on their way at
            // once, so a backlog (a long downtime) is worked off without all of it in memory.
            let (skipped, onTheirWay) = condition.withLock { (delivering, inFlight) }
            let room = max(0, Self.maxInFlight - onTheirWay)
            let due = room == 0 ? [] : (try? core.journal.timers(dueAtOrBefore: now, limit: room) {
                !skipped.contains(TimerID(entity: $0.entity, id: $0.id))
            }) ?? []
            for timer in due { deliver(timer) }
            // All the room taken: more may be due behind them, and if some of them went to wait for a
            // registration there is room again. (Otherwise each delivery's end wakes the loop.)
            if room > 0, due.count == room { continue }

            // The next timer still to come (one not due yet is never being delivered).
            let upcoming = now == .max ? nil : (try? core.journal.timers(dueAtOrAfter: now + 1, limit: 1))?.first
            var wait: Duration? = nil
            // A test clock skips idle time to durable timers only: alarms watch work in progress (an
            // activity's timeouts) or housekeeping (passivation sweeps), never what an idle runtime
            // waits for — skipping to them would run the clock on forever.
            if let upcoming, core.isIdle, core.clock.advanceWhenIdle(to: upcoming.dueNanoseconds) { continue }
            if let nextDeadline = [upcoming?.dueNanoseconds, nextAlarmDeadline].compactMap({ $0 }).min() {
                wait = core.clock.realWait(until: nextDeadline)
            }
            condition.lock()
            if !woken && !stopping {
                parks.withLock {
                    parkedInFlight = inFlight
                    parkings += 1
                    parks.broadcast()
                }
                if let wait {
                    let (seconds, attoseconds) = wait.components
                    let interval = Double(seconds) + Double(attoseconds) / 1e18
                    _ = condition.wait(until: Date(timeIntervalSinceNow: max(0.000_1, interval)))
                } else {
                    condition.wait()
                }
                parks.withLock { parkedInFlight = nil }
            }
            condition.unlock()
        }
    }

    private func deliver(_ timer: JournalTimer) {
        let id = TimerID(entity: timer.entity, id: timer.id)
        condition.lock()
        let fresh = delivering.insert(id).inserted
        mostInFlightValue = max(mostInFlightValue, inFlight)
        condition.unlock()
        guard fresh else { return }
        // A row that fails its check (damaged on disk) is never fired: neither its entity, nor its id,
        // nor its payload can be trusted. The owner its key names is asked to store again what it is
        // owed — an activity's retry timer is rebuilt from its stored task, a run body's timer from
        // its history — and the row goes if it was the owner's; otherwise it is set aside.
        if !timer.isIntact, ActivityWorker.isRetryTimer(id: timer.id) {
            core.becameBusy()
            core.activities.repairRetryTimer(timer) { [self] owned in
                if owned { release(id, busy: true) } else { setAside(timer, busy: true) }
            }
            return
        }
        let isRetry = timer.payload.first == 1  // an activity's next attempt (see ActivityWorker)
        if timer.isIntact {
            handedOver.add(1, ordering: .releasing)
            (isRetry ? fired.retry : fired.entity).increment()
            let now = core.clock.nowNanoseconds()
            lag.recordNanoseconds(Int64(clamping: now &- min(timer.dueNanoseconds, now)))
        }
        if timer.isIntact, isRetry {
            core.becameBusy()
            core.activities.retryDue(timer) { [self] in release(id, busy: true) }
            return
        }
        let name: EntityName
        switch Result(catching: { () throws(JournalError) in try core.journal.metadata(of: timer.entity)?.name }) {
        case .success(let found?):
            name = found
        case .success(nil) where !timer.isIntact:
            setAside(timer, busy: false)
            return
        case .success(nil):
            // No entity owns it (a damaged journal): set aside like a timer whose type is not
            // registered, so it holds no room, and looked at again on a registration or the next open.
            condition.withLock { _ = undelivered.insert(id) }
            core.logger.error("a timer's entity has no metadata; the timer is set aside",
                              metadata: ["entity.key": "\(timer.entity)", "timer": "\(timer.id)"])
            return
        case .failure(let error):
            // A failed read: looked at again in a second.
            core.logger.warning("reading a timer's entity failed; it is tried again in a second",
                                metadata: ["entity.key": "\(timer.entity)", "error": "\(error)"])
            core.retryShortly { [self] in release(id, busy: false) }
            return
        }
        // Its entity type not registered (yet), the timer stays marked until a registration calls
        // ``retryUndelivered()``. Marked under the types' lock: a registration adds its type under
        // that lock before it retries, so it either is seen here or finds the timer marked.
        let found = core.types.withLock { types -> (any RegisteredEntityType)? in
            if let type = types[name.type] { return type }
            condition.withLock { _ = undelivered.insert(id) }
            return nil
        }
        guard let type = found else {
            core.logger.debug("a timer waits for its entity type's registration", metadata: ["entity.key": "\(timer.entity)"])
            return
        }
        core.becameBusy()
        guard timer.isIntact else {
            type.repair(.timer(id: timer.id, due: timer.dueNanoseconds), entityID: name.id, core: core) { [self] result in
                switch result {
                case .success(true):
                    core.logger.warning("a stored timer failed its check (damaged on disk); its entity's history stored it again",
                                        metadata: ["entity.type": "\(name.type)", "entity.id": "\(name.id)", "timer": "\(timer.id)"])
                    release(id, busy: true)
                case .failure(let error) where error.code == .storage:
                    core.becameIdle()
                    core.retryShortly { [self] in release(id, busy: false) }
                case .success(false):
                    // Not claimed by this repair, the row may still have been the entity's: a load for
                    // another message stored it again first (and it may have fired since).
                    let row = Result(catching: { () throws(JournalError) in
                        try core.journal.timers(dueAtOrAfter: timer.dueNanoseconds, dueAtOrBefore: timer.dueNanoseconds) {
                            $0.entity == timer.entity && $0.id == timer.id
                        }
                    })
                    if case .success(let rows) = row, rows.allSatisfy(\.isIntact) { release(id, busy: true) } else { setAside(timer, busy: true) }
                case .failure:
                    setAside(timer, busy: true)
                }
            }
            return
        }
        type.fireTimer(id: timer.id, due: timer.dueNanoseconds, entityID: name.id, core: core) { [self] result in
            switch result {
            case .success:
                release(id, busy: true)
            case .failure(let error) where error.code == .storage:
                // The commit failed; the row is still due: tried again in a second.
                core.becameIdle()
                core.retryShortly { [self] in release(id, busy: false) }
            case .failure(let error):
                // The entity cannot take it (it failed to load, the runtime closes): set aside like a
                // timer whose type is not registered, looked at again on a registration or the next
                // open. Redelivering it at once would spin for as long as the process lives.
                condition.withLock { _ = undelivered.insert(id) }
                core.becameIdle()
                if error.code != .closed {
                    core.logger.error("a timer's entity refused it; the timer is set aside until the next open",
                                      metadata: ["entity.type": "\(name.type)", "entity.id": "\(name.id)", "timer": "\(timer.id)",
                                                 "error": "\(error)"])
                }
            }
        }
    }

    /// A damaged timer (see ``deliver(_:)``) that no owner claimed: set aside until the next open (it
    /// holds no room, and a registration's second look passes it over), and reported once.
    /// It stays among those being delivered, so it is not looked at again; `busy`: its delivery took
    /// a busy count, which ends.
    private func setAside(_ timer: JournalTimer, busy: Bool) {
        condition.withLock { _ = damaged.insert(TimerID(entity: timer.entity, id: timer.id)) }
        defer { if busy { core.becameIdle() } }
        core.logger.error("a stored timer fails its check (damaged on disk) and no entity claims it; it is set aside and not fired",
                          metadata: ["timer.due": "\(timer.dueNanoseconds)", "entity.key": "\(timer.entity)", "timer": "\(timer.id)"])
    }

    /// The loop waiting: the timers on their way when it began to, and how many times it went to wait.
    struct Parked: Sendable {
        let inFlight: Int
        let parkings: Int
    }

    /// Waits until the loop is waiting (now or later) in a way that `accepts`; returns how, or nil after
    /// `timeout` (real time). For tests: a waiting loop has done all it could with the due timers and
    /// the room it had (`parkings` tells a later wait from one that began before).
    func park(timeout: Duration, where accepts: (Parked) -> Bool) -> Parked? {
        let (seconds, attoseconds) = timeout.components
        let deadline = Date(timeIntervalSinceNow: Double(seconds) + Double(attoseconds) / 1e18)
        parks.lock()
        defer { parks.unlock() }
        while true {
            if let parkedInFlight {
                let parked = Parked(inFlight: parkedInFlight, parkings: parkings)
                if accepts(parked) { return parked }
            }
            if !parks.wait(until: deadline) { return nil }
        }
    }

    /// Timer `id` is no longer on its way (delivered, or to be tried again), and the delivery's
    /// busy count ends if it took one: the loop looks again.
    private func release(_ id: TimerID, busy: Bool) {
        condition.withLock { _ = delivering.remove(id) }
        if busy { core.becameIdle() }
        wake()
    }
}
