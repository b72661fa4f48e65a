import Synchronization
import Testing
import VirtCore

@testable import IncusBackend

/// The wait for a quiet host before a spare is made: /proc/stat read right, and the wait ending
/// only after enough idle time in a row, or when cut short.
@Suite("Quiet host: when the spare for the next revert is made", .timeLimit(.minutes(1)))
struct QuietHostTests {
    /// Samples handed out one by one, the last one for ever after; counts the calls.
    final class Script: Sendable {
        private let state: Mutex<(samples: [CPUTimes?], calls: Int)>
        init(_ samples: [CPUTimes?]) { state = Mutex((samples, 0)) }
        var calls: Int { state.withLock { $0.calls } }
        func next() -> CPUTimes? {
            state.withLock { state in
                state.calls += 1
                return state.samples.count > 1 ? state.samples.removeFirst() : state.samples.first ?? nil
            }
        }
    }

    /// Times after intervals of 100 ticks per CPU with `busy` CPUs' worth busy in each.
    static func samples(cpus: Int, busy: [Double]) -> [CPUTimes] {
        var times = CPUTimes(busy: 5000, total: 90000, cpus: cpus)
        var result = [times]
        for load in busy {
            times.busy += UInt64(load * 100)
            times.total += UInt64(cpus * 100)
            result.append(times)
        }
        return result
    }

    func host(_ script: Script) -> QuietHost {
        QuietHost(interval: .milliseconds(1), sample: { script.next() })
    }

    @Test("/proc/stat's summary line: busy time with steal, idle and iowait only in the total; the CPUs counted")
    func parse() throws {
        let text = """
            cpu  100 20 30 1000 50 5 6 7 40 0
            cpu0 50 10 15 500 25 2 3 3 20 0
            cpu1 50 10 15 500 25 3 3 4 20 0
            intr 12345 0 0
            ctxt 999
            """
        #expect(CPUTimes.parse(text) == CPUTimes(busy: 168, total: 1218, cpus: 2))
        // Old kernels' shorter line; no per-CPU lines counts one.
        #expect(CPUTimes.parse("cpu  10 0 10 80\n") == CPUTimes(busy: 20, total: 100, cpus: 1))
        for bad in ["", "intr 1 2 3\ncpu  1 2 3 4", "cpu  a b c d", "cpu  1 2 3"] {
            #expect(CPUTimes.parse(bad) == nil, "\(bad)")
        }
        let here = try #require(CPUTimes.read(), "/proc/stat of this host")
        #expect(here.cpus >= 1 && here.total > here.busy)
    }

    @Test("busy CPUs between two samples; counters that went backwards count as idle")
    func busyCPUs() {
        let earlier = CPUTimes(busy: 1000, total: 5000, cpus: 2)
        #expect(CPUTimes(busy: 1150, total: 5200, cpus: 2).busyCPUs(since: earlier) == 1.5)
        #expect(CPUTimes(busy: 1000, total: 5000, cpus: 2).busyCPUs(since: earlier) == 0)
        #expect(CPUTimes(busy: 900, total: 5200, cpus: 2).busyCPUs(since: earlier) == 0)
    }

    @Test("on two CPUs the wait ends after two intervals in a row with at most half a CPU busy, not before")
    func waitsForTwoQuietIntervals() async {
        // Busy, busy, quiet, busy (the count starts again), quiet, quiet.
        let script = Script(Self.samples(cpus: 2, busy: [1.9, 1.0, 0.2, 0.6, 0.5, 0.1, 2, 2]))
        #expect(await host(script).wait())
        #expect(script.calls == 7, "it returned at the second quiet interval in a row")
    }

    @Test("a large host is quiet with a CPU and a half idle; a one-CPU host never is")
    func sizes() async {
        let eight = Script(Self.samples(cpus: 8, busy: [6.6, 6.5, 6.5]))
        #expect(await host(eight).wait())
        #expect(eight.calls == 4)
        let one = Script(Self.samples(cpus: 1, busy: [0, 0, 0]))
        let waiting = Task { await host(one).wait() }
        // Ten looks at an idle one-CPU host, however long a busy test machine takes to make them.
        let looked = await Deadline(after: .seconds(50)).poll(every: .milliseconds(10)) { one.calls > 10 }
        #expect(looked, "it stopped looking")
        waiting.cancel()
        #expect(await waiting.value == false, "it found a one-CPU host quiet")
    }

    @Test("cancelling the wait ends it at once; an unreadable /proc/stat counts as quiet")
    func cancelAndUnknown() async {
        let busy = Script(Self.samples(cpus: 2, busy: [2]))
        let slow = QuietHost(interval: .seconds(3600), sample: { busy.next() })
        let waiting = Task { await slow.wait() }
        // An hour's interval: only the cancellation can end it within the time limit.
        waiting.cancel()
        #expect(await waiting.value == false)
        #expect(await host(Script([nil])).wait())
        #expect(await host(Script([CPUTimes(busy: 1, total: 10, cpus: 2), nil])).wait())
    }
}
