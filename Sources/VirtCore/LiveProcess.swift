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

    /// Field 3 of /proc/PID/stat (R, S, D, Z, ...), or nil when it cannot be read.
    public static func state(of pid: pid_t) -> Character? {
        guard let text = SmallFile.text("/proc/\(pid)/stat", limit: 4096), let close = text.lastIndex(of: ")") else {
            return nil
        }
        return text[text.index(after: close)...].dropFirst().first
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
