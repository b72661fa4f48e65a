import Synchronization

// Cancellable waiting primitives.
//
// A timed-out call is cancelled by `withTimeout`; whatever it was waiting on must let go at once
// and leave the state usable, so these never wait on anything that ignores cancellation.
// AsyncStream is not usable here: cancelling a task blocked in its `next()` terminates the stream.

/// A queue with one consumer at a time, whose waits can be cancelled without closing the queue.
public final class Mailbox<Element: Sendable>: Sendable {
    private struct State {
        var elements: [Element] = []
        var head = 0
        var failure: VirtError?
        var waiter: (id: UInt64, continuation: CheckedContinuation<Element, any Error>)?
        var nextWaiterID: UInt64 = 0

        mutating func popFirst() -> Element? {
            guard head < elements.count else { return nil }
            let element = elements[head]
            head += 1
            // Compact now and then so a long-lived queue does not keep every element ever pushed.
            if head == elements.count {
                elements.removeAll(keepingCapacity: true)
                head = 0
            } else if head >= 1024 && head * 2 >= elements.count {
                elements.removeFirst(head)
                head = 0
            }
            return element
        }
    }

    private let state = Mutex(State())

    public init() {}

    /// Adds an element, handing it straight to a waiting consumer if there is one; ignored once finished.
    public func push(_ element: Element) {
        let waiter = state.withLock { state -> CheckedContinuation<Element, any Error>? in
            guard state.failure == nil else { return nil }
            if let waiter = state.waiter {
                state.waiter = nil
                return waiter.continuation
            }
            state.elements.append(element)
            return nil
        }
        waiter?.resume(returning: element)
    }

    /// Ends the queue: elements already queued are still delivered, then `next()` throws `error`.
    public func finish(throwing error: VirtError) {
        let waiter = state.withLock { state -> CheckedContinuation<Element, any Error>? in
            guard state.failure == nil else { return nil }
            state.failure = error
            defer { state.waiter = nil }
            return state.waiter?.continuation
        }
        waiter?.resume(throwing: error)
    }

    /// Whether ``finish(throwing:)`` was called.
    public var isFinished: Bool { state.withLock { $0.failure != nil } }

    /// The next element; throws the finishing error once drained, or `CancellationError` when the
    /// calling task is cancelled (the queue stays usable).
    public func next() async throws -> Element {
        try await next(until: nil)
    }

    /// The next element, or a ``VirtError/Code/timeout`` error naming `what` once `timeout` has
    /// passed. Unlike a `withTimeout` around ``next()``, an element is never lost to a timer
    /// that fires as it arrives: the waiter is taken either by the element or by the timer.
    public func next(timeout: Duration, _ what: String) async throws -> Element {
        let deadline = ContinuousClock.now + timeout
        let failure = VirtError(.timeout, "\(what) timed out after \(timeout.formattedSeconds)")
        return try await next(until: (deadline, failure))
    }

    private func next(until limit: (deadline: ContinuousClock.Instant, failure: VirtError)?) async throws -> Element {
        // What is queued already needs neither a waiter nor a timer.
        let (queued, id) = state.withLock { state -> (Element?, UInt64) in
            if let element = state.popFirst() { return (element, 0) }
            state.nextWaiterID += 1
            return (nil, state.nextWaiterID)
        }
        if let queued { return queued }
        // Fires at the deadline (or later): a waiter not parked by then finds the deadline
        // passed when it parks.
        let timer = limit.map { limit in
            Task {
                guard (try? await Task.sleep(until: limit.deadline)) != nil else { return }
                self.take(id)?.resume(throwing: limit.failure)
            }
        }
        defer { timer?.cancel() }
        return try await park { continuation in
            state.withLock { state -> Result<Element, any Error>? in
                if let element = state.popFirst() { return .success(element) }
                if let failure = state.failure { return .failure(failure) }
                if Task.isCancelled { return .failure(CancellationError()) }
                if let limit, ContinuousClock.now >= limit.deadline { return .failure(limit.failure) }
                precondition(state.waiter == nil, "Mailbox has a single consumer")
                state.waiter = (id, continuation)
                return nil
            }
        } take: {
            self.take(id)
        }
    }

    /// Removes the parked waiter if it is `id`'s.
    private func take(_ id: UInt64) -> CheckedContinuation<Element, any Error>? {
        state.withLock { state in
            guard let waiter = state.waiter, waiter.id == id else { return nil }
            state.waiter = nil
            return waiter.continuation
        }
    }
}

/// A fair mutual-exclusion lock for async code whose waiters can be cancelled.
///
/// An actor alone does not serialise async methods (they interleave at every `await`), and QGA
/// replies carry no id: two commands in flight at once could not be told apart.
public final class AsyncLock: Sendable {
    private struct State {
        var held = false
        var waiters = Waiters<Void>()
    }

    private let state = Mutex(State())

    public init() {}

    /// Waits for the lock; throws `CancellationError` (without taking it) when cancelled first.
    public func lock() async throws {
        let id = state.withLock { $0.waiters.makeID() }
        try await park { continuation in
            state.withLock { state -> Result<Void, any Error>? in
                if !state.held {
                    state.held = true
                    return .success(())
                }
                if Task.isCancelled { return .failure(CancellationError()) }
                state.waiters.park(id, continuation)
                return nil
            }
        } take: {
            self.state.withLock { $0.waiters.remove(id) }
        }
    }

    /// Runs `body` holding the lock, released however `body` ends; throws `CancellationError`
    /// without running it when cancelled while waiting.
    public func withLock<T: Sendable>(
        isolation: isolated (any Actor)? = #isolation, _ body: () async throws -> T
    ) async throws -> T {
        try await lock()
        defer { unlock() }
        return try await body()
    }

    /// Releases the lock, handing it directly to the longest waiter.
    public func unlock() {
        let next = state.withLock { state -> CheckedContinuation<Void, any Error>? in
            guard !state.waiters.isEmpty else {
                state.held = false
                return nil
            }
            return state.waiters.removeFirst()
        }
        next?.resume()
    }
}

/// Cancellable waiters parked until something happens, each resumed once.
private struct Waiters<Value> {
    private var parked: [(id: UInt64, continuation: CheckedContinuation<Value, any Error>)] = []
    private var nextID: UInt64 = 0

    mutating func makeID() -> UInt64 {
        nextID += 1
        return nextID
    }

    mutating func park(_ id: UInt64, _ continuation: CheckedContinuation<Value, any Error>) {
        parked.append((id, continuation))
    }

    mutating func remove(_ id: UInt64) -> CheckedContinuation<Value, any Error>? {
        guard let index = parked.firstIndex(where: { $0.id == id }) else { return nil }
        return parked.remove(at: index).continuation
    }

    mutating func removeAll() -> [CheckedContinuation<Value, any Error>] {
        defer { parked.removeAll() }
        return parked.map(\.continuation)
    }

    var isEmpty: Bool { parked.isEmpty }

    /// The longest waiter, taken out; the caller checked ``isEmpty``.
    mutating func removeFirst() -> CheckedContinuation<Value, any Error> {
        parked.removeFirst().continuation
    }
}

/// Parks the calling task until it is resumed, unless `decide` settles the wait at once.
///
/// `decide` runs once, and must do its work under the lock that guards the waiters: return the
/// outcome, or park the continuation and return nil. It must also fail with `CancellationError`
/// when `Task.isCancelled`, read under that lock: the flag is set before `onCancel` runs, so a
/// cancellation either shows there or finds the waiter parked. `take` removes this wait's parked
/// continuation (nil when it is gone already), which is then resumed with `CancellationError`.
private func park<Value>(
    _ decide: (CheckedContinuation<Value, any Error>) -> Result<Value, any Error>?,
    take: @Sendable () -> CheckedContinuation<Value, any Error>?
) async throws -> Value {
    try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Value, any Error>) in
            if let outcome = decide(continuation) { continuation.resume(with: outcome) }
        }
    } onCancel: {
        take()?.resume(throwing: CancellationError())
    }
}

/// A value set once and awaited by any number of tasks, whose waits can be cancelled.
public final class Latch<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiters = Waiters<Value>()
    }

    private let state = Mutex(State())

    public init() {}

    /// Sets the value and wakes every waiter; later calls are ignored.
    public func set(_ value: Value) {
        let woken = state.withLock { state -> [CheckedContinuation<Value, any Error>] in
            guard state.value == nil else { return [] }
            state.value = value
            return state.waiters.removeAll()
        }
        for waiter in woken { waiter.resume(returning: value) }
    }

    /// The value if it has been set.
    public var value: Value? { state.withLock { $0.value } }

    /// Waits for the value; throws `CancellationError` when the calling task is cancelled first.
    public func wait() async throws -> Value {
        let id = state.withLock { $0.waiters.makeID() }
        return try await park { continuation in
            state.withLock { state -> Result<Value, any Error>? in
                if let value = state.value { return .success(value) }
                if Task.isCancelled { return .failure(CancellationError()) }
                state.waiters.park(id, continuation)
                return nil
            }
        } take: {
            self.state.withLock { $0.waiters.remove(id) }
        }
    }
}

/// Operations in flight that a shutdown must outwait, with a gate that stops new ones.
///
/// A close that finds an `incus launch` or an open still running waits for it, so that what it
/// makes is known and cleaned up, instead of outliving the server.
public final class InFlight: Sendable {
    private struct State {
        var count = 0
        var closed = false
        var idle = Waiters<Void>()
    }

    private let state = Mutex(State())

    public init() {}

    /// Counts one more operation; false (and nothing counted) once ``close()`` was called, unless
    /// `evenIfClosed` (work that finishes what was already started, such as deleting an instance
    /// a revert replaced).
    @discardableResult
    public func enter(evenIfClosed: Bool = false) -> Bool {
        state.withLock { state in
            guard evenIfClosed || !state.closed else { return false }
            state.count += 1
            return true
        }
    }

    /// Ends an operation that ``enter(evenIfClosed:)`` counted.
    public func leave() {
        let woken = state.withLock { state -> [CheckedContinuation<Void, any Error>] in
            precondition(state.count > 0, "InFlight.leave without enter")
            state.count -= 1
            return state.count == 0 ? state.idle.removeAll() : []
        }
        for waiter in woken { waiter.resume() }
    }

    /// Stops new operations (``enter(evenIfClosed:)`` fails from now on).
    public func close() { state.withLock { $0.closed = true } }

    public var isClosed: Bool { state.withLock { $0.closed } }

    /// How many operations are in flight now.
    public var count: Int { state.withLock { $0.count } }

    /// Waits until no operation is in flight, at most `timeout`; true when that happened. A
    /// cancelled caller waits too: the shutdown that calls this must know what was made.
    public func waitUntilIdle(timeout: Duration) async -> Bool {
        await Task { await self.idle(within: timeout) }.value
    }

    private func idle(within timeout: Duration) async -> Bool {
        let id = state.withLock { $0.idle.makeID() }
        do {
            try await withTimeout(timeout, "waiting for operations in flight") { [self] in
                try await park { continuation in
                    state.withLock { state -> Result<Void, any Error>? in
                        if state.count == 0 { return .success(()) }
                        if Task.isCancelled { return .failure(CancellationError()) }
                        state.idle.park(id, continuation)
                        return nil
                    }
                } take: {
                    self.state.withLock { $0.idle.remove(id) }
                }
            }
            return true
        } catch {
            return false
        }
    }
}
