import Synchronization
import VirtCore

/// The POSIX file operations the cache needs, with errors as ``VirtError`` naming the path.
///
/// Plain system calls rather than Foundation: the cache must control modes (0700 directories,
/// 0600 files whatever the umask), fsync and rename, which FileManager hides.
public enum CacheFiles {
    /// The file's status, or nil when it does not exist (or cannot be examined).
    static func status(_ path: String) -> stat? {
        var info = stat()
        return stat(path, &info) == 0 ? info : nil
    }

    static func exists(_ path: String) -> Bool { status(path) != nil }

    /// Creates `path` and missing parents with mode 0700, then makes sure `path` is a directory of
    /// ours that only we can enter: the cache holds what QEMU boots, so no other user may swap it.
    static func makePrivateDirectory(_ path: String) throws(VirtError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, 0o700) != 0 && errno != EEXIST {
                throw VirtError(.io, "cannot create the image cache directory \(prefix)", errno: errno)
            }
        }
        guard let info = status(path), info.st_mode & S_IFMT == S_IFDIR else {
            throw VirtError(.io, "the image cache \(path) is not a directory")
        }
        guard info.st_uid == geteuid() else {
            throw VirtError(.io, "the image cache \(path) belongs to another user (uid \(info.st_uid))")
        }
        if info.st_mode & 0o777 != 0o700 && chmod(path, 0o700) != 0 {
            throw VirtError(.io, "cannot make the image cache \(path) private (mode 0700)", errno: errno)
        }
    }

    /// The names in a directory, without `.` and `..`.
    static func names(in directory: String) throws(VirtError) -> [String] {
        guard let names = DirectoryEntries.names(in: directory) else {
            throw VirtError(.io, "cannot list the image cache \(directory)", errno: errno)
        }
        return names
    }

    /// Flushes a file's data to the disk, so that a rename after a crash never exposes a name
    /// whose content was still in the page cache.
    static func sync(_ fd: Int32, _ path: String) throws(VirtError) {
        while fsync(fd) != 0 {
            if errno == EINTR { continue }
            throw VirtError(.io, "cannot write \(path) to the disk", errno: errno)
        }
    }

    /// Flushes a directory, which makes the renames and unlinks in it durable.
    static func syncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        // Best effort: the entry is complete either way; only its name might not survive a crash.
        _ = fsync(fd)
        close(fd)
    }

    /// Renames atomically: readers see the old file or the new one under `to`, never a mix.
    static func move(_ from: String, to: String) throws(VirtError) {
        guard rename(from, to) == 0 else {
            throw VirtError(.io, "cannot rename \(from) to \(to)", errno: errno)
        }
    }

    /// Removes a file; a file that is already gone is not an error.
    static func remove(_ path: String) {
        _ = unlink(path)
    }

    /// The first line of a small file, nil when it is missing or unreadable.
    static func readLine(_ path: String) -> String? {
        SmallFile.firstLine(path)
    }

    /// Replaces `path` with a file holding `line` and a newline: written to a temporary name,
    /// synced, then renamed, so a reader sees the old or the new line, never half of one.
    static func writeLine(_ line: String, to path: String) throws(VirtError) {
        let (fd, temporary) = try TemporaryFile.make(prefix: path + ".tmp.")
        do throws(VirtError) {
            try writeAll(fd, Array((line + "\n").utf8), "cannot write \(temporary)")
            try sync(fd, temporary)
            close(fd)
            try move(temporary, to: path)
        } catch {
            close(fd)
            remove(temporary)
            throw error
        }
    }

    /// Sets a file's access and modification times to now: its last use, for eviction.
    static func touch(_ path: String) {
        // Best effort: a stale time only makes the entry a little likelier to be evicted.
        _ = utimensat(AT_FDCWD, path, nil, 0)
    }

    /// Bytes the file occupies on the disk: what the cache's bound is about (a sparse raw image
    /// costs its blocks, not its apparent size).
    static func diskUsage(_ info: stat) -> Int64 { Int64(info.st_blocks) * 512 }

    /// Modification time in nanoseconds since the epoch.
    public static func modificationTime(_ info: stat) -> Int64 {
        Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec)
    }

    /// Bytes available to us on the filesystem holding `path`, nil when unknown.
    static func availableBytes(_ path: String) -> Int64? {
        var info = statvfs()
        guard statvfs(path, &info) == 0 else { return nil }
        return Int64(info.f_bavail) * Int64(info.f_frsize)
    }
}

/// An flock(2) on a lock file, held until ``release()`` or ``removeAndRelease()``.
///
/// A lock file may be removed by whoever holds its lock (eviction does); anyone who locked the
/// removed file then sees that the name points elsewhere and starts over, so two processes never
/// both believe they hold the entry.
final class FileLock {
    let path: String
    private var fd: Int32

    private init(path: String, fd: Int32) {
        self.path = path
        self.fd = fd
    }

    deinit { release() }

    /// Waits for an exclusive lock on `path`, creating the file (mode 0600) if needed.
    ///
    /// The wait polls with a non-blocking flock and sleeps in between: a blocking flock would hold
    /// one of the few threads of Swift's cooperative pool for as long as another server downloads,
    /// and could not be cancelled. `waiting` is called once, when the lock is found taken.
    static func acquire(_ path: String, waiting: () -> Void) async throws(VirtError) -> FileLock {
        var announced = false
        let lock = try await Deadline.none.poll(every: .milliseconds(100)) { () throws(VirtError) -> FileLock? in
            if let lock = try attempt(path) { return lock }
            if !announced {
                waiting()
                announced = true
            }
            return nil
        }
        guard let lock else { throw VirtError(.timeout, "cancelled while waiting for the lock \(path)") }
        return lock
    }

    /// An exclusive lock on `path` if nobody holds one, else nil.
    static func attempt(_ path: String) throws(VirtError) -> FileLock? {
        while true {
            let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else {
                throw VirtError(.io, "cannot open the lock file \(path)", errno: errno)
            }
            if flock(fd, LOCK_EX | LOCK_NB) != 0 {
                let number = errno
                close(fd)
                if number == EWOULDBLOCK || number == EINTR { return nil }
                throw VirtError(.io, "cannot lock \(path)", errno: number)
            }
            // The holder before us may have removed the file we opened: then our lock guards
            // nothing and we must lock whatever the name holds now.
            var held = stat()
            if fstat(fd, &held) == 0, let current = CacheFiles.status(path),
                current.st_ino == held.st_ino, current.st_dev == held.st_dev
            {
                return FileLock(path: path, fd: fd)
            }
            SpawnHygiene.unlockAndClose(fd)
        }
    }

    /// Releases the lock at once, even while a child forked meanwhile still shares the
    /// descriptor (``SpawnHygiene/unlockAndClose(_:)``).
    func release() {
        SpawnHygiene.unlockAndClose(fd)
        fd = -1
    }

    /// Removes the lock file, then releases the lock: for an entry that no longer exists.
    func removeAndRelease() {
        if fd >= 0 { CacheFiles.remove(path) }
        release()
    }
}

/// The entries this process uses, each held open with a shared flock until the process ends.
///
/// A server boots every revert and reboot from the cached file again, so eviction (by any
/// process) must leave alone an entry in use: it try-locks the entry exclusively and skips it
/// when that fails.
enum Pins {
    private static let held = Mutex<[String: Int32]>([:])

    /// Takes a shared lock on the file at `path` for the rest of this process (once per path).
    static func pin(_ path: String) throws(VirtError) {
        let result: VirtError? = held.withLock { held in
            if held[path] != nil { return nil }
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                return VirtError(.io, "cannot open \(path)", errno: errno)
            }
            // Non-blocking: an exclusive lock on an entry is only taken, briefly, by an eviction
            // that holds the entry's lock file, which the caller holds now.
            guard flock(fd, LOCK_SH | LOCK_NB) == 0 else {
                let number = errno
                close(fd)
                return VirtError(.io, "cannot lock \(path) for use", errno: number)
            }
            held[path] = fd
            return nil
        }
        if let result { throw result }
    }

    /// Drops this process's shared lock on `path`, if it holds one.
    static func unpin(_ path: String) {
        held.withLock { held in
            if let fd = held.removeValue(forKey: path) { SpawnHygiene.unlockAndClose(fd) }
        }
    }

    /// Whether some process, this one included, uses the file at `path`.
    static func isInUse(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        // The probe's lock, when it gets one, must not outlive this call in a forked child.
        defer { SpawnHygiene.unlockAndClose(fd) }
        // Our own pins are other open file descriptions, so they make this fail too.
        return flock(fd, LOCK_EX | LOCK_NB) != 0
    }
}
