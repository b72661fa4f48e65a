import Glibc

/// Whether a process runs, as the clean-up code needs to know: a zombie has ended (it only
/// waits for its parent to read its status), and a process /proc hides (hidepid) but the
/// kernel knows of (EPERM from `kill(pid, 0)`) still runs.
public enum LiveProcess {
    public static func isRunning(_ pid: pid_t) -> Bool {
        guard pid > 0 else { return false }
        if let state = state(of: pid) { return state != "Z" && state != "X" }
        return kill(pid, 0) == 0 || errno == EPERM
    }

    /// What a running pid whose start time cannot be read counts as: /proc hides it (hidepid:
    /// another user's process), or its stat cannot be read for another reason.
    public enum UnreadableStart: Sendable {
        /// The process looked for, whoever's it is: its owner may be another user's server.
        case owner
        /// The process looked for only when it is this user's (it may be signalled): what is
        /// asked about is this user's, and so was the process that made it.
        case ownerIfOurs
    }

    /// Whether `pid` runs and is the process that started at `startTime` (field 22 of its
    /// stat), not another under a recycled pid; an empty `startTime` (not recorded) matches any.
    public static func isProcess(_ pid: pid_t, startedAt startTime: String, unreadable: UnreadableStart) -> Bool {
        guard isRunning(pid) else { return false }
        guard let started = self.startTime(of: pid) else {
            return unreadable == .owner || kill(pid, 0) == 0
        }
        return startTime.isEmpty || started == startTime
    }

    /// Field 3 of /proc/PID/stat (R, S, D, Z, ...), or nil when it cannot be read.
    public static func state(of pid: pid_t) -> Character? {
        statFields(of: pid)?.first?.first
    }

    /// Field 22 of /proc/PID/stat: when the process started, in clock ticks after the host's
    /// boot (with the pid, it names one process: a recycled pid has another start time); nil
    /// when there is no such process (or /proc hides it).
    public static func startTime(of pid: pid_t) -> String? {
        guard let fields = statFields(of: pid), fields.count > 19 else { return nil }
        return String(fields[19])
    }

    /// Field 4 of /proc/PID/stat, the parent's pid; nil when there is no such process.
    public static func parent(of pid: pid_t) -> pid_t? {
        statFields(of: pid).flatMap { $0.count > 1 ? pid_t($0[1]) : nil }
    }

    /// The fields of /proc/PID/stat from field 3 on. The command name (field 2) may hold spaces
    /// and parentheses: they are counted from the last ')'.
    static func statFields(of pid: pid_t) -> [Substring]? {
        guard let text = SmallFile.text("/proc/\(pid)/stat", limit: 4096), let close = text.lastIndex(of: ")") else {
            return nil
        }
        return text[text.index(after: close)...].split(separator: " ")
    }

    /// Waits, polling, until `pid` no longer runs or `seconds` have passed; whether it ended.
    public static func waitForEnd(of pid: pid_t, seconds: Int) -> Bool {
        for _ in 0..<(seconds * 50) {
            if !isRunning(pid) { return true }
            usleep(20_000)
        }
        return !isRunning(pid)
    }
}
