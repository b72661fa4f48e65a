import Synchronization
import VirtCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Cleans up after this server however it dies: a small watcher process, in a session of its
/// own, waits for end of file on a pipe whose only writer is this process. When the server ends
/// (SIGKILL from a job runner, the OOM killer, a crash) the kernel closes the pipe and the
/// watcher runs this executable's `gc --owner PID`, which removes what the server left (a
/// running QEMU with the test still on the network, an instance directory, an Incus
/// instance). A server that cleaned up says so (``disarm()``) and the watcher just ends.
///
/// The watcher is `/bin/sh` (no shell code of anyone's making: the script is a constant and
/// the command its arguments), so that an idle server does not keep a second copy of itself in
/// memory.
public enum DeathWatch {
    /// The command the watcher runs once this process is gone: this executable with
    /// `arguments`.
    public static func argv(executable: String, arguments: [String]) -> [String] {
        // A line is the server's "cleaned up"; end of file without one is its death.
        ["/bin/sh", "-c", #"if read -r _; then exit 0; fi; exec "$@""#, "debusine-virt-watch", executable] + arguments
    }

    /// Starts the watcher; false (logged) when it cannot, which leaves `gc` to an admin as before.
    @discardableResult
    public static func start(arguments: [String]) -> Bool {
        guard let executable = ownExecutable() else {
            log.debug("no death watch: /proc/self/exe is unreadable")
            return false
        }
        guard let (readEnd, writeEnd) = SpawnHygiene.pipe() else {
            log.debug("no death watch: cannot make a pipe: \(String(cString: strerror(errno)))")
            return false
        }
        defer { close(readEnd) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, readEnd, 0)
        // stdout is the protocol's: the watcher must not hold it open, or write to it.
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // A session of its own survives a kill of the server's process group; default signal
        // dispositions and an empty mask, whatever this process has set up.
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for number in [SIGPIPE, SIGTERM, SIGINT, SIGHUP] { sigaddset(&defaults, number) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setsigmask(&attributes, &empty)
        // POSIX_SPAWN_SETSID (glibc 2.26) is only declared with _GNU_SOURCE.
        let setSessionID: Int32 = 0x80
        posix_spawnattr_setflags(&attributes, Int16(setSessionID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let argv = argv(executable: executable, arguments: arguments)
        var cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for pointer in cArguments { free(pointer) } }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, "/bin/sh", &actions, &attributes, &cArguments, environ)
        guard status == 0 else {
            log.debug("no death watch: cannot start /bin/sh: \(String(cString: strerror(status)))")
            close(writeEnd)
            return false
        }
        // writeEnd stays open for the life of this process: its closing without a line first is
        // the signal. It is close-on-exec, so no other child holds it.
        watchFD.store(writeEnd, ordering: .relaxed)
        log.debug("death watch: pid \(pid) runs `\(executable) \(arguments.joined(separator: " "))` when this server ends")
        return true
    }

    /// The watcher's pipe, -1 when there is none.
    static let watchFD = Atomic<Int32>(-1)

    /// Tells the watcher that this process cleaned up after itself and it has nothing to do.
    public static func disarm() {
        let fd = watchFD.exchange(-1, ordering: .relaxed)
        guard fd >= 0 else { return }
        _ = write(fd, "\n", 1)
        close(fd)
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
