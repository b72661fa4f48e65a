import Synchronization
import Testing
import VirtCore

@testable import IncusBackend

/// The bookkeeping that keeps every instance a server makes findable by its close, without incusd:
/// the commands are stood in for by what they do to the names and the in-flight count.
@Suite("Owned instances: the running one, the spare, and a close that finds both")
struct OwnedInstancesTests {
    /// Whether `task` has ended, after giving it time to (never a proof that it will not).
    private func ended<T>(_ task: Task<T, Never>, within: Duration = .milliseconds(200)) async -> Bool {
        let done = Latch<Void>()
        let watcher = Task {
            _ = await task.value
            done.set(())
        }
        defer { watcher.cancel() }
        try? await Task.sleep(for: within)
        return done.value != nil
    }

    @Test("a close waits for an instance being made, then takes its name; nothing is made after it begins")
    func closeWaitsForMaking() async {
        let instances = OwnedInstances()
        #expect(instances.beginMaking("first", as: .current))
        let closing = Task { await instances.close(within: .seconds(30)) }
        while !instances.isClosed { await Task.yield() }
        #expect(!instances.beginMaking("second", as: .spare))
        #expect(await ended(closing) == false)
        instances.leave()
        let taken = await closing.value
        #expect(taken.current == "first")
        #expect(taken.spare == nil)
        #expect(instances.current == nil)
    }

    @Test(
        "a spare made while the test ran becomes the running instance at revert; the old one stays counted until deleted"
    )
    func revertPromotesSpare() async {
        let instances = OwnedInstances()
        #expect(instances.beginMaking("first", as: .current))
        instances.leave()
        instances.prepareSpare {
            guard instances.beginMaking("spare", as: .spare) else { return nil }
            instances.leave()
            return "spare"
        }
        let (old, spareTask) = instances.retireCurrent()
        #expect(old == "first")
        #expect(spareTask != nil)
        #expect(instances.current == nil)
        #expect(await instances.promote(spareTask) == "spare")
        #expect(instances.current == "spare")
        // The retired instance's deletion is still running: a close waits for it.
        let closing = Task { await instances.close(within: .seconds(30)) }
        #expect(await ended(closing) == false)
        instances.leave()
        let taken = await closing.value
        #expect(taken.current == "spare")
        #expect(taken.spare == nil)
    }

    @Test(
        "a spare is made once at a time, never while closing, and one made as the close began is the close's to delete")
    func spareOnceAndNotPromotedAfterClose() async {
        let instances = OwnedInstances()
        let calls = Mutex(0)
        let named = Latch<Void>()
        let release = Latch<Void>()
        let make: @Sendable () async -> String? = {
            calls.withLock { $0 += 1 }
            guard instances.beginMaking("spare", as: .spare) else { return nil }
            named.set(())
            try? await release.wait()
            instances.leave()
            return "spare"
        }
        instances.prepareSpare(make)
        instances.prepareSpare(make)
        try? await named.wait()
        // The task is handed to a revert, but the spare being made is still there: none is started.
        let (_, spareTask) = instances.retireCurrent()
        instances.prepareSpare(make)
        let closing = Task { await instances.close(within: .seconds(30)) }
        while !instances.isClosed { await Task.yield() }
        release.set(())
        #expect(await instances.promote(spareTask) == nil)
        let taken = await closing.value
        #expect(taken.spare == "spare")
        #expect(taken.current == nil)
        instances.prepareSpare(make)
        try? await Task.sleep(for: .milliseconds(50))
        #expect(calls.withLock { $0 } == 1)
    }

    @Test(
        "a spare waiting for a quiet host is made at once when a revert comes; a close ends the wait and nothing is made",
        .timeLimit(.minutes(1)))
    func waitCutShort() async {
        let instances = OwnedInstances()
        let waits = Mutex(0)
        // A host that never gets quiet: the wait ends only by cancellation.
        let neverQuiet: @Sendable () async -> Void = {
            waits.withLock { $0 += 1 }
            try? await Task.sleep(for: .seconds(3600))
        }
        let make: @Sendable () async -> String? = {
            guard instances.beginMaking("spare", as: .spare) else { return nil }
            instances.leave()
            return "spare"
        }
        #expect(instances.beginMaking("first", as: .current))
        instances.leave()
        instances.prepareSpare(after: neverQuiet, make)
        let waiting = await Deadline(after: .seconds(50)).poll(every: .milliseconds(10)) { waits.withLock { $0 } == 1 }
        #expect(waiting, "the spare's making did not wait first")
        let (old, spareTask) = instances.retireCurrent()
        #expect(old == "first")
        instances.leave()
        // Only the revert's cancelling the wait can end it within the time limit.
        #expect(await instances.promote(spareTask) == "spare")

        let made = Mutex(0)
        instances.prepareSpare(after: neverQuiet) {
            made.withLock { $0 += 1 }
            return await make()
        }
        _ = await Deadline(after: .seconds(50)).poll(every: .milliseconds(10)) { waits.withLock { $0 } == 2 }
        let taken = await instances.close(within: .seconds(30))
        #expect(taken.current == "spare")
        #expect(taken.spare == nil)
        // The making ran, after the wait, and found the server closing.
        let ran = await Deadline(after: .seconds(50)).poll(every: .milliseconds(10)) { made.withLock { $0 } == 1 }
        #expect(ran, "the close did not end the wait")
        #expect(instances.current == nil)
    }

    @Test("a revert's deletion is counted even when the close began first, and a dropped name is not the close's")
    func retireWhileClosing() async {
        let instances = OwnedInstances()
        #expect(instances.beginMaking("first", as: .current))
        let closing = Task { await instances.close(within: .seconds(30)) }
        while !instances.isClosed { await Task.yield() }
        // The launch ends, and a revert (already under way) takes the name before the close does.
        let (old, _) = instances.retireCurrent()
        instances.leave()
        #expect(old == "first")
        #expect(await ended(closing) == false)
        #expect(await instances.counted { () async -> Int in 7 } == 7)
        instances.leave()
        let taken = await closing.value
        #expect(taken.current == nil && taken.spare == nil)

        let other = OwnedInstances()
        #expect(other.beginMaking("gone", as: .current))
        other.drop("gone")
        other.leave()
        let none = await other.close(within: .seconds(30))
        #expect(none.current == nil && none.spare == nil)
    }

    @Test("a close gives up waiting at its deadline and still takes the names")
    func closeDeadline() async {
        let instances = OwnedInstances()
        #expect(instances.beginMaking("stuck", as: .current))
        let taken = await instances.close(within: .milliseconds(100))
        #expect(taken.current == "stuck")
        #expect(instances.current == nil)
        instances.leave()
    }
}
