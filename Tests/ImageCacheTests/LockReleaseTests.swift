import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache

/// A released lock is free at once, even while a child forked meanwhile (by any thread of the
/// process, as every spawn does) still shares its descriptor because it has not exec'd yet.
///
/// Each test holds such a child deterministically: `fork()` here, the child only sleeps and
/// `_exit`s, and is killed as soon as the check is made.
@Suite("Locks released while a forked child shares them")
struct LockReleaseTests {
    /// Runs `body` while a forked child that never execs holds copies of all our descriptors.
    func whileAForkedChildHoldsDescriptors(_ body: () async throws -> Void) async throws {
        let child = fork()
        if child == 0 {
            // Only async-signal-safe calls in the child of a threaded process. It ends by itself
            // should this process die before killing it.
            sleep(20)
            _exit(0)
        }
        try #require(child > 0, "fork failed: \(String(cString: strerror(errno)))")
        defer {
            kill(child, SIGKILL)
            var status: Int32 = 0
            while waitpid(child, &status, 0) < 0 && errno == EINTR {}
        }
        try await body()
    }

    func withDirectory(_ body: (String) async throws -> Void) async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-lock-test.")
        defer { TestPaths.removeTree(directory) }
        try await body(directory)
    }

    @Test("a released file lock can be taken again while a forked child has its descriptor")
    func fileLock() async throws {
        try await withDirectory { directory in
            let path = "\(directory)/entry.lock"
            let lock = try #require(try FileLock.attempt(path))
            try await whileAForkedChildHoldsDescriptors {
                lock.release()
                let again = try FileLock.attempt(path)
                #expect(again != nil, "the lock is still held by the forked child's copy")
                again?.release()
            }
        }
    }

    @Test("an abandoned save lets the next save of its key begin while a forked child lives")
    func abandonedSave() async throws {
        try await withDirectory { directory in
            let store = StateStore(cacheDirectory: "\(directory)/images")
            let key = StateStore.key(for: "fork")
            let first = try #require(try store.beginSaving(key))
            try await whileAForkedChildHoldsDescriptors {
                first.abandon()
                let second = try store.beginSaving(key)
                #expect(second != nil, "the abandoned save's lock is still held")
                second?.abandon()
            }
        }
    }

    @Test("an unpinned file is no longer in use while a forked child has the pin's descriptor")
    func unpin() async throws {
        try await withDirectory { directory in
            let path = "\(directory)/image"
            let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
            try #require(fd >= 0)
            close(fd)
            try Pins.pin(path)
            #expect(Pins.isInUse(path), "a pinned file is in use")
            try await whileAForkedChildHoldsDescriptors {
                Pins.unpin(path)
                #expect(!Pins.isInUse(path), "the pin is still held by the forked child's copy")
            }
        }
    }
}
