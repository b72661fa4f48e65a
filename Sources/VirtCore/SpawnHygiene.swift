import Glibc

/// What our own posix_spawn calls need so that a child holds no descriptor but its stdin,
/// stdout and stderr, and what every descriptor that a child must not keep alive needs.
///
/// Clients run servers concurrently in one process (the tests do, in parallel): a child that
/// inherits another one's pipe end keeps that one from ever seeing end of file, and a child
/// that outlives its user (a process it forked) keeps it for ever. Glibc's Swift module hides pipe2,
/// posix_spawn_file_actions_addclosefrom_np and _addchdir_np, so they are looked up at run time.
public enum SpawnHygiene {
    private typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    private typealias Pipe2 = @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32

    private static let closeFrom: CloseFrom? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np")
        else { return nil }
        return unsafeBitCast(symbol, to: CloseFrom.self)
    }()

    private typealias AddChdir =
        @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32

    private static let addChdir: AddChdir? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addchdir_np")
        else { return nil }
        return unsafeBitCast(symbol, to: AddChdir.self)
    }()

    /// Makes the child start in `directory` (glibc 2.29 and later); false when it cannot.
    public static func changeDirectory(_ actions: inout posix_spawn_file_actions_t, to directory: String) -> Bool {
        guard let addChdir else { return false }
        return directory.withCString { addChdir(&actions, $0) } == 0
    }

    private static let pipe2: Pipe2? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "pipe2") else { return nil }
        return unsafeBitCast(symbol, to: Pipe2.self)
    }()

    /// Makes the child close every descriptor from 3 up (glibc 2.34 and later).
    public static func closeStrayDescriptors(_ actions: inout posix_spawn_file_actions_t) {
        _ = closeFrom?(&actions, 3)
    }

    /// Makes the child start with every signal at its default action and none blocked: whatever
    /// the spawning process ignores or blocks (a test runner, a signal-handling thread) must not
    /// leak into the child. `attributes` must be initialised.
    public static func resetSignals(_ attributes: inout posix_spawnattr_t) {
        var allSignals = sigset_t()
        sigfillset(&allSignals)
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigdefault(&attributes, &allSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
    }

    /// A pipe whose both ends are close-on-exec from the start, with no window in which
    /// another thread's spawn could inherit them.
    public static func pipe() -> (read: Int32, write: Int32)? {
        var fds: [Int32] = [-1, -1]
        if let pipe2 {
            guard pipe2(&fds, O_CLOEXEC) == 0 else { return nil }
        } else {
            guard Glibc.pipe(&fds) == 0 else { return nil }
            _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
            _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        }
        return (fds[0], fds[1])
    }

    /// Releases an flock(2) lock held on `fd`, then closes it.
    ///
    /// A lock belongs to the open file description, and a child forked by any thread of this
    /// process shares that description until it execs (close-on-exec acts only then): a plain
    /// `close` leaves the lock held for as long as such a child sits between fork and exec,
    /// which on a loaded machine is long enough for the next locker to find it taken.
    /// `LOCK_UN` acts on the description itself, so the lock is gone whoever else holds it.
    public static func unlockAndClose(_ fd: Int32) {
        guard fd >= 0 else { return }
        _ = flock(fd, LOCK_UN)
        close(fd)
    }
}
