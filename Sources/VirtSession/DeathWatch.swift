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
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, readEnd, 0)
        // stdout is the protocol's: the watcher must not hold it open, or write to it.
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        // A descriptor the caller gave us without close-on-exec (a pipe it waits on) must not
        // stay open in the watch after we are gone.
        SpawnHygiene.closeStrayDescriptors(&actions)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Default signal dispositions and an empty mask, whatever this process has set up; and
        // a session of its own, which survives a kill of the server's process group.
        SpawnHygiene.resetSignals(&attributes)
        // POSIX_SPAWN_SETSID (glibc 2.26) is only declared with _GNU_SOURCE.
        let setSessionID: Int32 = 0x80
        guard
            posix_spawnattr_setflags(
                &attributes, Int16(setSessionID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK)) == 0
        else {
            log.debug("no death watch: posix_spawn cannot start a new session here")
            close(writeEnd)
            return false
        }
        let argv = argv(executable: executable, arguments: arguments)
        var cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for pointer in cArguments { free(pointer) } }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, "/bin/sh", &actions, &attributes, &cArguments, environ)
        guard status == 0 else {
            log.debug("no death watch: cannot start /bin/sh: \(VirtError.text(errno: status))")
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
        let path = String(cString: buffer)
        // A rebuilt or reinstalled binary shows as "PATH (deleted)": then there is none to run.
        return path.hasSuffix(" (deleted)") ? nil : path
    }
}
