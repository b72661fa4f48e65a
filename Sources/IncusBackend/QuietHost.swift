import VirtCore

/// The host's CPU time so far, from the first line of /proc/stat, in clock ticks summed over all
/// CPUs, and how many CPUs there are.
struct CPUTimes: Equatable, Sendable {
    /// Time spent running something: user, nice, system, irq, softirq and steal (time the
    /// hypervisor gave to others is time this host's tasks waited).
    var busy: UInt64
    /// Busy time plus idle and iowait.
    var total: UInt64
    var cpus: Int

    /// The times in /proc/stat's text; nil when its first line is not the `cpu` summary.
    static func parse(_ text: String) -> CPUTimes? {
        let lines = text.split(separator: "\n")
        guard let summary = lines.first, summary.hasPrefix("cpu ") else { return nil }
        // user nice system idle iowait irq softirq steal (guest and guest_nice are in user and
        // nice already).
        let words = summary.split(separator: " ").dropFirst().prefix(8)
        let fields = words.compactMap { UInt64($0) }
        guard fields.count == words.count, fields.count >= 4 else { return nil }
        let field = { (index: Int) -> UInt64 in index < fields.count ? fields[index] : 0 }
        let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7)
        let cpus = lines.dropFirst().filter { $0.hasPrefix("cpu") && $0.dropFirst(3).first?.isNumber == true }.count
        return CPUTimes(busy: busy, total: busy + field(3) + field(4), cpus: max(cpus, 1))
    }

    /// This host's times now; nil when /proc/stat cannot be read.
    static func read() -> CPUTimes? {
        SmallFile.text("/proc/stat").flatMap(parse)
    }

    /// How many CPUs' worth were busy, on average, between `earlier` and these times.
    func busyCPUs(since earlier: CPUTimes) -> Double {
        guard total > earlier.total, busy >= earlier.busy else { return 0 }
        return Double(busy - earlier.busy) / Double(total - earlier.total) * Double(cpus)
    }
}

/// Waits for a quiet moment on the host: at least `idleNeeded` CPUs idle, on average, through
/// each of `intervals` intervals in a row.
///
/// Making an Incus spare unpacks the image: incusd and its `tar` take about a CPU and a half for
/// a second or two (1.8-2.1 CPU-seconds in 1.3-1.9 s on a `dir` pool on tmpfs here). Made while
/// the test ran, on a two-core worker, it slowed CPU-bound commands right after `open` by
/// 22-40 % (docs/performance.md). Made when that much is idle (between two tests, while
/// autopkgtest copies or waits) it takes nothing from the test; a revert that comes first stops
/// the wait and the spare is made then, as a launch would be. A one-CPU host is never quiet: its
/// spares are made at revert. /proc/stat is the whole machine's: a server confined to some CPUs
/// or under a CPU quota judges by the machine's idle time, and time waiting for I/O counts as
/// idle.
struct QuietHost: Sendable {
    var idleNeeded = 1.5
    var interval: Duration = .milliseconds(500)
    var intervals = 2
    /// The host's CPU times; nil when unknown, which counts as quiet (the wait never ends
    /// otherwise).
    var sample: @Sendable () -> CPUTimes? = { CPUTimes.read() }

    /// Returns once the host is quiet, or at once when the calling task is cancelled. True when
    /// the host was found quiet.
    @discardableResult
    func wait() async -> Bool {
        guard var last = sample() else { return true }
        var quietInARow = 0
        do {
            try await Task.sleep(for: interval)
        } catch {
            return false
        }
        return await Deadline.none.poll(every: interval) { () -> Bool in
            guard let now = sample() else { return true }
            defer { last = now }
            let idle = Double(now.cpus) - now.busyCPUs(since: last)
            quietInARow = idle >= idleNeeded ? quietInARow + 1 : 0
            return quietInARow >= intervals
        }
    }
}
