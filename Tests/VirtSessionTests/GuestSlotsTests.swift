import Synchronization
import Testing
import VirtCore

@testable import VirtTestSupport

/// The order in which tests that run guests get their slots.
@Suite("Guest slots")
struct GuestSlotsTests {
    /// Keeps a slot's holder running until opened.
    final class Gate: Sendable {
        private let opened = Mutex(false)
        func open() { opened.withLock { $0 = true } }
        func wait() async {
            _ = await Deadline(after: .seconds(600)).poll(every: .milliseconds(2)) { opened.withLock { $0 } }
        }
    }

    /// What ran, in order.
    final class Order: Sendable {
        private let names = Mutex<[String]>([])
        func append(_ name: String) { names.withLock { $0.append(name) } }
        var all: [String] { names.withLock { $0 } }
    }

    /// Waits until `condition` holds of the slots (a test's steps must not race the actor).
    func until(_ slots: GuestSlots, _ condition: @escaping @Sendable (GuestSlots) async -> Bool) async {
        _ = await Deadline(after: .seconds(600)).poll(every: .milliseconds(2)) { await condition(slots) }
    }

    @Test("those waiting get the slot longest first, then in the order they came")
    func longestFirst() async {
        let slots = GuestSlots(limit: 1)
        let order = Order()
        let holder = Gate()
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await slots.run(longest: 1) { await holder.wait() } }
            await until(slots) { await $0.freeCount == 0 }
            for (index, (name, length)) in [("short", 60), ("long", 2400), ("middle", 600), ("middle too", 600)]
                .enumerated()
            {
                group.addTask { await slots.run(longest: length) { order.append(name) } }
                await until(slots) { await $0.waitingCount == index + 1 }
            }
            holder.open()
        }
        #expect(order.all == ["long", "middle", "middle too", "short"])
    }

    @Test("a test waiting for every slot is overtaken by a longer one only, which takes a slot that is free")
    func everySlot() async {
        let slots = GuestSlots(limit: 2)
        let order = Order()
        let holder = Gate()
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await slots.run(longest: 1) { await holder.wait() } }
            await until(slots) { await $0.freeCount == 1 }
            group.addTask { await slots.run(slots: 2, longest: 60) { order.append("all") } }
            await until(slots) { await $0.waitingCount == 1 }
            // Longer: it runs at once, on the free slot, while the holder still has the other.
            group.addTask { await slots.run(longest: 2400) { order.append("long") } }
            await until(slots) { _ in order.all == ["long"] }
            await until(slots) { await $0.freeCount == 1 }
            // As long: behind the one that waits for both slots, though a slot is free.
            group.addTask { await slots.run(longest: 60) { order.append("as long") } }
            await until(slots) { await $0.waitingCount == 2 }
            #expect(order.all == ["long"])
            holder.open()
        }
        #expect(order.all == ["long", "all", "as long"])
    }
}
