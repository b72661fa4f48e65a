import Foundation
import Testing

/// How many QEMU guests the tests of one process run at once (`DEBUSINE_VIRT_TEST_GUESTS`, 2 by
/// default), whatever their suites.
///
/// A TCG guest keeps both cores of a CI machine busy while it boots or works. A dozen at once
/// (every VM suite starting together) made each several times slower, past boot and reply
/// timeouts, without finishing any sooner than one after the other; the tests that need no
/// guest still run beside them. Two at once may fill the gaps one guest leaves (host-side
/// work, waits): the first phase of `scripts/test` took 942 s once with two, against 1060 s with
/// one, but 1160 s in the next whole run (with the benchmark runs added); runs here differ by
/// 10 % and more, so the gain is not shown.
public actor GuestSlots {
    public static let shared = GuestSlots(
        limit: Int(ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_GUESTS"] ?? "").flatMap { $0 > 0 ? $0 : nil }
            ?? 2)

    /// How many slots there are.
    public nonisolated let limit: Int
    private var free: Int
    /// Who waits, and for how many slots: first come first served, except that tests marked
    /// `ahead` go before the others.
    private var waiting: [(count: Int, ahead: Bool, continuation: CheckedContinuation<Void, Never>)] = []

    init(limit: Int) {
        self.limit = limit
        free = limit
    }

    func acquire(_ count: Int, ahead: Bool) async {
        let place = ahead ? (waiting.firstIndex { !$0.ahead } ?? waiting.endIndex) : waiting.endIndex
        // First in the queue: nobody to wait behind, only for the slots (a test waiting for all
        // of them may be behind it, with one free).
        if place == 0 && free >= count {
            free -= count
            return
        }
        await withCheckedContinuation { continuation in
            waiting.insert((count, ahead, continuation), at: place)
        }
    }

    /// How many wait now, and how many slots are free.
    var waitingCount: Int { waiting.count }
    var freeCount: Int { free }

    func release(_ count: Int) {
        free += count
        // In order: a test waiting for every slot is not overtaken for ever by tests taking one
        // (only by those marked ahead, a few).
        while let first = waiting.first, first.count <= free {
            free -= first.count
            waiting.removeFirst().continuation.resume()
        }
    }

    /// Runs `body` holding `count` slots (at most all of them); `ahead`: before the tests that
    /// are not.
    public func run<T: Sendable>(
        slots count: Int = 1, ahead: Bool = false, _ body: @Sendable () async throws -> T
    ) async rethrows -> T {
        let count = max(1, min(count, limit))
        let clock = ContinuousClock()
        let asked = clock.now
        await acquire(count, ahead: ahead)
        let granted = clock.now
        // What CI's time goes to: each test's hold of the slots, in the log.
        let shared = self === Self.shared
        defer { if shared { Self.report(slots: count, waited: granted - asked, held: clock.now - granted) } }
        do {
            let result = try await body()
            release(count)
            return result
        } catch {
            release(count)
            throw error
        }
    }

    private nonisolated static func report(slots: Int, waited: Duration, held: Duration) {
        let name = Test.current.map { $0.displayName ?? $0.name } ?? "(no test)"
        let seconds = { (duration: Duration) in String(format: "%.1f", Double(duration.components.seconds)) }
        FileHandle.standardError.write(
            Data("guest slots: \(slots) held \(seconds(held)) s after waiting \(seconds(waited)) s: \(name)\n".utf8))
    }
}

/// The trait of a test that runs QEMU guests: it waits for a ``GuestSlots`` slot, then runs
/// for at most `timeLimit`.
///
/// In place of `.timeLimit`, which would count the wait for the slot too (Swift Testing applies
/// it around the test's scoping traits): a test that waited for others would time out without
/// having run.
public struct GuestSlot: TestTrait, TestScoping {
    public let timeLimit: Duration
    /// How many guests the test runs at once, up to all the slots there are.
    public let slots: Int
    /// Whether the test goes before the others waiting for a slot.
    public let ahead: Bool

    public func provideScope(
        for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void
    ) async throws {
        guard testCase != nil else {
            try await function()
            return
        }
        let limit = timeLimit
        let clock = ContinuousClock()
        let asked = clock.now
        // The group ends (and with it the test's function) before this returns.
        try await withoutActuallyEscaping(function) { function in
            try await GuestSlots.shared.run(slots: slots, ahead: ahead) {
                let started = clock.now
                // Swift Testing's own figure counts the wait for the slot too: this line is what
                // the test itself took, for finding where a run's time goes.
                defer {
                    let name = test.displayName ?? test.name
                    let held = Self.seconds(clock.now - started)
                    let waited = Self.seconds(started - asked)
                    FileHandle.standardError.write(
                        Data("guest-slot: \(held) s after waiting \(waited) s: \(name)\n".utf8))
                }
                try await Self.race(function, against: limit)
            }
        }
    }

    static func seconds(_ duration: Duration) -> Int { Int(duration.components.seconds) }

    /// Runs `function`, recording an issue and cancelling it when it outlasts `limit`.
    static func race(_ function: @escaping @Sendable () async throws -> Void, against limit: Duration) async throws {
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await function()
                return true
            }
            group.addTask {
                try await Task.sleep(for: limit)
                return false
            }
            defer { group.cancelAll() }
            guard let finished = try await group.next(), finished else {
                Issue.record("the test ran longer than its time limit of \(limit) (once it had a guest slot)")
                return
            }
        }
    }
}

extension Trait where Self == GuestSlot {
    /// Runs QEMU guests: as many tests of this kind at a time as ``GuestSlots`` allows, each for at most
    /// `minutes` once it runs. A test that runs several guests at once takes as many `slots`.
    ///
    /// `ahead`: the test goes before the others waiting. For the longest tests, whose guests run
    /// one after another: started last, such a test ends its phase alone, one core idle.
    public static func guestSlot(minutes: Int, slots: Int = 1, ahead: Bool = false) -> Self {
        GuestSlot(timeLimit: .seconds(minutes * 60), slots: slots, ahead: ahead)
    }
}
