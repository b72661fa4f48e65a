import Synchronization
import VirtCore

/// The instances one server owns: the one the testbed runs in, the spare made for the next revert
/// (and the task making it), and the commands in flight that make, start or delete them.
///
/// An instance of ours is always either named here or in the hands of a counted command, and one
/// lock guards both names together with the "closing" check. So ``close(within:)`` takes both
/// names in the same step that finds nothing in flight, and nothing a launch, a spare's making or
/// a revert was doing can slip between the two and outlive the server.
///
/// Lock order: ``InFlight``'s lock may be taken while holding `state`'s, never the other way round.
final class OwnedInstances: Sendable {
    /// What an instance is made for.
    enum Role { case current, spare }

    private struct State {
        var current: String?
        var spare: String?
        var spareTask: Task<String?, Never>?
        /// What the spare's making waits for first (a quiet host): cut short by a revert, which
        /// needs the spare now, and by a close.
        var spareWait: Task<Void, Never>?
    }

    private let state = Mutex(State())
    private let inFlight = InFlight()

    init() {}

    /// The name of the instance the testbed runs in.
    var current: String? { state.withLock { $0.current } }

    /// Whether ``close(within:)`` has begun: nothing new is made from then on.
    var isClosed: Bool { inFlight.isClosed }

    /// Names `name` as the instance for `role` and counts its making, in one step with the check
    /// that the server is not closing; false, with nothing named or counted, once it is. The caller
    /// ends the count with ``leave()`` when the command making the instance ends.
    func beginMaking(_ name: String, as role: Role) -> Bool {
        state.withLock { state in
            guard inFlight.enter() else { return false }
            switch role {
            case .current: state.current = name
            case .spare: state.spare = name
            }
            return true
        }
    }

    /// Ends what ``beginMaking(_:as:)`` or ``retireCurrent()`` counted.
    func leave() { inFlight.leave() }

    /// Runs `body` (a command that starts or deletes an instance) counted, even while closing:
    /// it finishes what was started, and a close waits for it.
    func counted<T, E: Error>(_ body: () async throws(E) -> T) async throws(E) -> T {
        inFlight.enter(evenIfClosed: true)
        defer { inFlight.leave() }
        return try await body()
    }

    /// Forgets `name` in whichever role holds it.
    func drop(_ name: String) {
        state.withLock { state in
            if state.current == name { state.current = nil }
            if state.spare == name { state.spare = nil }
        }
    }

    /// Takes the running instance's name, for a revert to delete, and the task making the spare
    /// that is to replace it. The name stays counted as in flight until its deletion ends
    /// (``leave()``), even while closing: a close finds either the name or its deletion.
    /// A spare still waiting to be made is made now.
    func retireCurrent() -> (old: String?, spare: Task<String?, Never>?) {
        state.withLock { state in
            defer {
                state.current = nil
                state.spareTask = nil
                state.spareWait?.cancel()
                state.spareWait = nil
            }
            if state.current != nil { inFlight.enter(evenIfClosed: true) }
            return (state.current, state.spareTask)
        }
    }

    /// Starts making a spare with `make` (which names it with ``beginMaking(_:as:)``), after
    /// `wait` unless a revert or a close cuts it short, unless there is one, made or being made,
    /// or the server is closing.
    func prepareSpare(
        after wait: (@Sendable () async -> Void)? = nil, _ make: @escaping @Sendable () async -> String?
    ) {
        state.withLock { state in
            guard !inFlight.isClosed, state.spareTask == nil, state.spare == nil else { return }
            let waiting = wait.map { wait in Task { await wait() } }
            state.spareWait = waiting
            state.spareTask = Task {
                await waiting?.value
                return await make()
            }
        }
    }

    /// The spare that `task` made, once its making ends, as the instance the testbed runs in now;
    /// nil when none was made or the server is closing (close deletes it then).
    func promote(_ task: Task<String?, Never>?) async -> String? {
        guard let task, let made = await task.value else { return nil }
        return state.withLock { state -> String? in
            guard state.spare == made, !inFlight.isClosed else { return nil }
            state.spare = nil
            state.current = made
            return made
        }
    }

    /// Stops new instances from being made, waits at most `timeout` for the commands in flight,
    /// and takes both names (leaving none here) in the same step that finds nothing in flight, or
    /// once the time is up.
    func close(within timeout: Duration) async -> (current: String?, spare: String?) {
        inFlight.close()
        // A spare not begun is never made now (its making finds the server closing).
        state.withLock { state in
            state.spareWait?.cancel()
            state.spareWait = nil
        }
        let deadline = Deadline(after: timeout)
        while true {
            _ = await inFlight.waitUntilIdle(timeout: deadline.remaining())
            let taken = state.withLock { state -> (String?, String?)? in
                guard inFlight.count == 0 || deadline.hasPassed else { return nil }
                defer {
                    state.current = nil
                    state.spare = nil
                }
                return (state.current, state.spare)
            }
            if let taken { return taken }
        }
    }
}
