import Synchronization
import Testing
import VirtCore

/// The waiting primitives of VirtCore that the servers build on: each ends its waits when it
/// should, and cancellation never leaves a waiter parked.
@Suite("Concurrency primitives")
struct ConcurrencyTests {
    @Test("poll returns the first value found, after as many looks as it took")
    func pollFindsValue() async throws {
        let looks = Mutex(0)
        // A deadline that cannot pass first: at the start of a test run the cooperative pool can
        // be busy for seconds (CI once took 13.7 s over these three looks against 10 s).
        let found = await Deadline(after: .seconds(600)).poll(every: .milliseconds(5)) { () -> Int? in
            let look = looks.withLock { count -> Int in
                count += 1
                return count
            }
            return look == 3 ? 42 : nil
        }
        #expect(found == 42)
        #expect(looks.withLock { $0 } == 3)
    }

    @Test("poll gives nil once the deadline passes, having looked at least once")
    func pollTimesOut() async throws {
        let looks = Mutex(0)
        let clock = ContinuousClock()
        let started = clock.now
        let found = await Deadline(after: .milliseconds(100)).poll(every: .milliseconds(20)) { () -> Int? in
            looks.withLock { $0 += 1 }
            return nil
        }
        #expect(found == nil)
        #expect(clock.now - started >= .milliseconds(100))
        #expect(clock.now - started < .seconds(60), "it stops once the deadline has passed")
        #expect(looks.withLock { $0 } >= 2)

        let once = Mutex(0)
        let passed = await Deadline(after: .zero).poll(every: .seconds(1)) { () -> Bool in
            once.withLock { $0 += 1 }
            return false
        }
        #expect(!passed)
        #expect(once.withLock { $0 } == 1)
    }

    @Test("poll passes on the check's error at once")
    func pollThrows() async throws {
        let error = await #expect(throws: VirtError.self) {
            _ = try await Deadline(after: .seconds(10)).poll(every: .milliseconds(5)) { () throws(VirtError) -> Int? in
                throw VirtError(.testbedFailure, "gone")
            }
        }
        #expect(error?.message == "gone")
    }

    @Test("a cancelled poll stops waiting at once")
    func pollCancelled() async throws {
        let clock = ContinuousClock()
        let started = clock.now
        let task = Task { await Deadline.none.poll(every: .seconds(3600)) { false } }
        try await Task.sleep(for: .milliseconds(50))
        task.cancel()
        #expect(await task.value == false)
        // Well under the hour between looks, with room for this process's busy start (its
        // executor's two threads busy for 20 s and more; see mailboxTimeout).
        #expect(clock.now - started < .seconds(600))
    }

    @Test("a mailbox's timed wait says what timed out, and delivers what comes in time")
    func mailboxTimeout() async throws {
        let mailbox = Mailbox<Int>()
        let error = await #expect(throws: VirtError.self) {
            _ = try await mailbox.next(timeout: .milliseconds(100), "a line")
        }
        #expect(error?.code == .timeout)
        #expect(error?.message == "a line timed out after 0.1 s")
        // The deadlines below are long because a deadline counts from the call, and this test
        // process starts its hundreds of tests at once on two cores: the task that pushes 20 ms
        // later was first run more than 10 s later in a CI run (ci90), after the timer.
        mailbox.push(1)
        #expect(try await mailbox.next(timeout: .seconds(300), "a line") == 1)
        Task {
            try await Task.sleep(for: .milliseconds(20))
            mailbox.push(2)
        }
        #expect(try await mailbox.next(timeout: .seconds(300), "a line") == 2)
    }

    @Test("elements arriving as timed waits expire are never lost, and come in order")
    func mailboxTimeoutLosesNothing() async throws {
        let mailbox = Mailbox<Int>()
        let count = 200
        let pusher = Task {
            for index in 0..<count {
                mailbox.push(index)
                if index % 3 == 0 { try await Task.sleep(for: .microseconds(700)) }
            }
        }
        var received: [Int] = []
        let deadline = Deadline(after: .seconds(120))
        while received.count < count && !deadline.hasPassed {
            do {
                received.append(try await mailbox.next(timeout: .milliseconds(1), "an element"))
            } catch let error as VirtError where error.code == .timeout {
                continue
            }
        }
        try await pusher.value
        #expect(received == Array(0..<count))
    }

    @Test("a latch wakes every waiter with its value; later sets are ignored")
    func latch() async throws {
        let latch = Latch<Int>()
        #expect(latch.value == nil)
        async let first = latch.wait()
        async let second = latch.wait()
        try await Task.sleep(for: .milliseconds(20))
        latch.set(7)
        latch.set(8)
        #expect(try await first == 7)
        #expect(try await second == 7)
        #expect(try await latch.wait() == 7)
        #expect(latch.value == 7)
    }

    @Test("a cancelled wait on a latch throws CancellationError and leaves the latch usable")
    func latchCancelled() async throws {
        let latch = Latch<Int>()
        let task = Task { try await latch.wait() }
        try await Task.sleep(for: .milliseconds(20))
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        latch.set(1)
        #expect(try await latch.wait() == 1)
    }

    @Test("waitUntilIdle returns once the last operation leaves, and at once when none runs")
    func inFlightIdle() async throws {
        let inFlight = InFlight()
        #expect(await inFlight.waitUntilIdle(timeout: .seconds(1)))
        #expect(inFlight.enter())
        #expect(inFlight.enter())
        #expect(inFlight.count == 2)
        let waiter = Task { await inFlight.waitUntilIdle(timeout: .seconds(300)) }
        try await Task.sleep(for: .milliseconds(20))
        inFlight.leave()
        try await Task.sleep(for: .milliseconds(20))
        inFlight.leave()
        #expect(await waiter.value)
        #expect(inFlight.count == 0)
    }

    @Test("waitUntilIdle gives false after its timeout while an operation runs")
    func inFlightTimeout() async throws {
        let inFlight = InFlight()
        inFlight.enter()
        #expect(await inFlight.waitUntilIdle(timeout: .milliseconds(50)) == false)
        inFlight.leave()
        #expect(await inFlight.waitUntilIdle(timeout: .milliseconds(50)))
    }

    @Test("a closed InFlight refuses new operations unless they finish earlier work")
    func inFlightClosed() async throws {
        let inFlight = InFlight()
        inFlight.close()
        #expect(inFlight.isClosed)
        #expect(inFlight.enter() == false)
        #expect(inFlight.count == 0)
        #expect(inFlight.enter(evenIfClosed: true))
        #expect(inFlight.count == 1)
        inFlight.leave()
        #expect(inFlight.count == 0)
    }

    @Test("a shutdown's waitUntilIdle waits even when its caller is cancelled")
    func inFlightWaitsWhenCancelled() async throws {
        let inFlight = InFlight()
        inFlight.enter()
        let clock = ContinuousClock()
        let task = Task {
            let started = clock.now
            let idle = await inFlight.waitUntilIdle(timeout: .seconds(300))
            return (idle, clock.now - started)
        }
        try await Task.sleep(for: .milliseconds(20))
        task.cancel()
        try await Task.sleep(for: .milliseconds(200))
        inFlight.leave()
        let (idle, waited) = await task.value
        #expect(idle)
        #expect(waited >= .milliseconds(200))
    }
}
