import VirtCore

/// Cleans up after this server however it dies: a small watcher process, in a session of its
/// own, waits for end of file on a pipe whose only writer is this process. When the server ends
/// (SIGKILL from a job runner, the OOM killer, a crash) the kernel closes the pipe and the
/// watcher runs this executable's `gc --owner PID`, which removes what the server left (a
/// running QEMU with the test still on the network, an instance directory, an Incus
/// instance). It runs after every exit, clean or not: a close that failed (incusd away for a
/// moment) leaves what only the watch will retry, and `gc --owner` touches nothing of a
/// server that still runs.
///
/// The watcher is `/bin/sh` (no shell code of anyone's making: the script is a constant and
/// the command its arguments), so that an idle server does not keep a second copy of itself in
/// memory.
public enum DeathWatch {
    /// The command the watcher runs once this process is gone: this executable with
    /// `arguments`.
    public static func argv(executable: String, arguments: [String]) -> [String] {
        ["/bin/sh", "-c", #"cat > /dev/null; exec "$@""#, "debusine-virt-watch", executable] + arguments
    }

    /// Starts the watcher; false (logged) when it cannot, which leaves `gc` to an admin as before.
    @discardableResult
    public static func start(arguments: [String]) -> Bool {
        guard let executable = ownExecutable() else {
            log.debug("no death watch: /proc/self/exe is unreadable")
            return false
        }
        guard let (readEnd, writeEnd) = SpawnHygiene.pipe() else {
            log.debug("no death watch: cannot make a pipe: \(VirtError.text(errno: errno))")
            return false
        }
        defer { close(readEnd) }
        let pid: pid_t
        do {
            // stdout is the protocol's: the watcher must not hold it open, or write to it. A
            // session of its own survives a kill of the server's process group.
            pid = try Spawn.start(
                argv(executable: executable, arguments: arguments),
                actions: [.duplicate(readEnd, onto: 0), .open(1, path: "/dev/null", flags: O_WRONLY)],
                newSession: true)
        } catch {
            log.debug("no death watch: \(error.message)")
            close(writeEnd)
            return false
        }
        // writeEnd stays open, unused, for the life of this process: its closing is the signal.
        // It is close-on-exec, so no other child holds it.
        _ = writeEnd
        log.debug(
            "death watch: pid \(pid) runs `\(executable) \(arguments.joined(separator: " "))` when this server ends")
        return true
    }

    static func ownExecutable() -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        buffer[count] = 0
        let path = String(nulTerminated: buffer)
        // A rebuilt or reinstalled binary shows as "PATH (deleted)": then there is none to run.
        return path.hasSuffix(" (deleted)") ? nil : path
    }
}
