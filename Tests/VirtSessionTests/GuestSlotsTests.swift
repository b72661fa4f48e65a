import Testing
import VirtCore

@testable import VirtTestSupport

/// The order in which tests waiting for a guest slot get one.
@Suite("Guest slots")
struct GuestSlotsTests {
    /// The names of the tests in the order they got the slot.
    actor Order {
        var names: [String] = []
        func append(_ name: String) { names.append(name) }
    }

    /// Whether `condition` holds within 300 s: a broken queue fails the test instead of hanging
    /// it, and a busy start of the test process (its executor's two threads busy for 20 s and
    /// more) does not.
    func eventually(_ condition: () async -> Bool) async -> Bool {
        await Deadline(after: .seconds(300)).poll(every: .milliseconds(5), until: condition)
    }

    /// A test holding one of `slots`' slots until the returned continuation finishes.
    func holdOne(
        of slots: GuestSlots
    ) async throws -> (holder: Task<Void, Never>, release: AsyncStream<Void>.Continuation) {
        let free = await slots.freeCount
        let (held, release) = AsyncStream.makeStream(of: Void.self)
        let holder = Task { await slots.run { for await _ in held {} } }
        try #require(await eventually { await slots.freeCount == free - 1 })
        return (holder, release)
    }

    @Test("the next free slot goes to the first test marked ahead, then to the others in the order they asked")
    func aheadFirst() async throws {
        let slots = GuestSlots(limit: 1)
        let order = Order()
        let (holder, release) = try await holdOne(of: slots)
        var waiters: [Task<Void, Never>] = []
        for (name, ahead) in [("first", false), ("ahead", true), ("second", false), ("ahead too", true)] {
            let before = await slots.waitingCount
            waiters.append(Task { await slots.run(ahead: ahead) { await order.append(name) } })
            #expect(await eventually { await slots.waitingCount == before + 1 }, "\(name) does not wait")
        }
        release.finish()
        await holder.value
        for waiter in waiters { await waiter.value }
        #expect(await order.names == ["ahead", "ahead too", "first", "second"])
    }

    @Test("a test marked ahead of one that waits for every slot takes a free slot at once")
    func aheadTakesFreeSlot() async throws {
        let slots = GuestSlots(limit: 2)
        let order = Order()
        let (holder, release) = try await holdOne(of: slots)
        let everything = Task { await slots.run(slots: 2) { await order.append("everything") } }
        try #require(await eventually { await slots.waitingCount == 1 })
        // One slot is free: the test marked ahead runs now, while the holder still holds its own.
        let ahead = Task { await slots.run(ahead: true) { await order.append("ahead") } }
        #expect(await eventually { await order.names == ["ahead"] }, "the test marked ahead waited")
        release.finish()
        await holder.value
        await ahead.value
        await everything.value
        #expect(await order.names == ["ahead", "everything"])
        #expect(await slots.freeCount == 2)
    }
}
