import Testing

@testable import VirtTestSupport

/// The order in which tests waiting for a guest slot get one.
@Suite("Guest slots")
struct GuestSlotsTests {
    /// The names of the tests in the order they got the slot.
    actor Order {
        var names: [String] = []
        func append(_ name: String) { names.append(name) }
    }

    @Test("the next free slot goes to the first test marked ahead, then to the others in the order they asked")
    func aheadFirst() async throws {
        let slots = GuestSlots(limit: 1)
        let order = Order()
        let (held, release) = AsyncStream.makeStream(of: Void.self)
        let holder = Task { await slots.run { for await _ in held {} } }
        while await slots.freeCount > 0 { await Task.yield() }
        var waiters: [Task<Void, Never>] = []
        for (name, ahead) in [("first", false), ("ahead", true), ("second", false), ("ahead too", true)] {
            let before = await slots.waitingCount
            waiters.append(Task { await slots.run(ahead: ahead) { await order.append(name) } })
            while await slots.waitingCount == before { await Task.yield() }
        }
        release.finish()
        await holder.value
        for waiter in waiters { await waiter.value }
        #expect(await order.names == ["ahead", "ahead too", "first", "second"])
    }
}
