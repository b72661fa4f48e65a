import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache

/// The saved-state store with real files, locks and sha256sum.
@Suite("Saved VM states in the cache")
struct StateStoreTests {
    func withStore(
        maximumEntries: Int = 4, runner: any CommandRunner = SubprocessRunner(),
        _ body: (StateStore, String) async throws -> Void
    ) async throws {
        let parent = try TestPaths.makeTemporaryDirectory("dv-state-test.")
        defer { TestPaths.removeTree(parent) }
        try await body(
            StateStore(cacheDirectory: "\(parent)/images", maximumEntries: maximumEntries, runner: runner), parent)
    }

    /// Overwrites the first byte of `path` in place, later than the file's last change.
    func rewriteInPlace(_ path: String, with byte: String = "9") throws {
        usleep(20_000)
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.write(contentsOf: Data(byte.utf8))
        try handle.close()
    }

    /// Saves an entry of two files under `key`.
    @discardableResult
    func save(_ store: StateStore, _ key: String, state: String = "memory") async throws -> StateStore.Entry {
        let builder = try #require(try store.beginSaving(key))
        try Data(state.utf8).write(to: URL(fileURLWithPath: "\(builder.path)/vmstate"))
        try Data("disk".utf8).write(to: URL(fileURLWithPath: "\(builder.path)/disk.qcow2"))
        try await builder.commit()
        return try #require(await store.lookup(key))
    }

    func names(_ directory: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
    }

    @Test("a saved entry is found by its key, lists every file in its manifest, and verifies")
    func saveAndFind() async throws {
        try await withStore { store, _ in
            let key = StateStore.key(for: "qemu 10\nargv ...\n")
            #expect(await store.lookup(key) == nil)
            let entry = try await save(store, key)
            #expect(entry.path == "\(store.directory)/\(key)")
            #expect(entry.digests.keys.sorted() == ["disk.qcow2", "vmstate"])
            #expect(entry.digests["vmstate"] == SHA256.hexDigest(of: Array("memory".utf8)))
            try await store.verify(entry)
            #expect(!names(store.directory).contains { $0.contains(".tmp.") }, "the temporary directory is renamed")
            var info = stat()
            #expect(stat(store.directory, &info) == 0 && info.st_mode & 0o777 == 0o700)
        }
    }

    @Test("a state file changed by one byte, truncated or missing fails verification, naming the file")
    func corruption() async throws {
        try await withStore { store, _ in
            for damage in ["flip", "truncate", "remove"] {
                let key = StateStore.key(for: damage)
                let entry = try await save(store, key, state: "0123456789")
                let file = entry.file("vmstate")
                switch damage {
                case "flip": try Data("0123456780".utf8).write(to: URL(fileURLWithPath: file))
                case "truncate": truncate(file, 5)
                default: unlink(file)
                }
                do throws(VirtError) {
                    try await store.verify(entry)
                    Issue.record("a \(damage)d state passed verification")
                } catch {
                    #expect(error.message.contains(file), "\(error.message)")
                }
                await store.discard(entry, corrupt: true)
                #expect(await store.lookup(key) == nil, "a discarded entry is gone")
            }
        }
    }

    @Test("a file as it was saved is not hashed; one rewritten in place, even with its old size and mtime, is")
    func recordedIdentity() async throws {
        let runner = LoopbackRunner()
        try await withStore(runner: runner) { store, _ in
            let entry = try await save(store, StateStore.key(for: "once"), state: "0123456789")
            #expect(entry.recorded.keys.sorted() == ["disk.qcow2", "vmstate"])
            let hashes = { runner.hashes }
            let before = hashes()
            try await store.verify(entry)
            try await store.verify(entry)
            #expect(hashes() == before, "nothing hashed while the files are as saved")
            // Same size, rewritten in place, its modification time then set back: only the change
            // time (which cannot be set back) tells.
            var saved = stat()
            #expect(stat(entry.file("vmstate"), &saved) == 0)
            try rewriteInPlace(entry.file("vmstate"))
            var times = [saved.st_atim, saved.st_mtim]
            #expect(utimensat(AT_FDCWD, entry.file("vmstate"), &times, 0) == 0)
            await #expect(throws: VirtError.self) { try await store.verify(entry) }
            #expect(hashes() == before + 1, "only the changed file is hashed")
        }
    }

    @Test(
        "a state without a record (older, or from another machine) is hashed once, then recorded; a change is still caught"
    )
    func unrecordedHashedOnce() async throws {
        let runner = LoopbackRunner()
        try await withStore(runner: runner) { store, _ in
            let key = StateStore.key(for: "unrecorded")
            let saved = try await save(store, key, state: "0123456789")
            #expect(unlink(saved.file(StateStore.identitiesName)) == 0)
            let entry = try #require(await store.lookup(key))
            #expect(entry.recorded.isEmpty)
            let hashes = { runner.hashes }
            let before = hashes()
            try await store.verify(entry)
            #expect(hashes() - before == 2, "both files hashed the first time")
            try await store.verify(entry)
            #expect(hashes() - before == 2, "nothing hashed again")
            // What it found is recorded: the next server takes the files as they are.
            let recorded = try #require(await store.lookup(key))
            #expect(recorded.recorded.keys.sorted() == ["disk.qcow2", "vmstate"])
            #expect(recorded.recorded == saved.recorded, "the same files, the same identities")
            try rewriteInPlace(entry.file("vmstate"))
            await #expect(throws: VirtError.self) { try await store.verify(entry) }
        }
    }

    @Test("check-states hashes every file of every state whatever was recorded, and removes only the corrupt one")
    func checkAll() async throws {
        let runner = LoopbackRunner()
        try await withStore(runner: runner) { store, _ in
            #expect(await store.checkAll().isEmpty)
            let good = try await save(store, StateStore.key(for: "good"))
            // Last used long ago: a check must not make it look used now.
            var old = [timespec(tv_sec: 1_000_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000_000, tv_nsec: 0)]
            #expect(utimensat(AT_FDCWD, good.path, &old, 0) == 0)
            let bad = try await save(store, StateStore.key(for: "bad"), state: "0123456789")
            // Flipped in place with size and times kept: bit rot, which no identity shows.
            var saved = stat()
            #expect(stat(bad.file("vmstate"), &saved) == 0)
            try Data("0123456780".utf8).write(to: URL(fileURLWithPath: bad.file("vmstate")))
            var times = [saved.st_atim, saved.st_mtim]
            #expect(utimensat(AT_FDCWD, bad.file("vmstate"), &times, 0) == 0)
            let before = runner.hashes
            let results = await store.checkAll()
            #expect(runner.hashes - before == 4, "every file of both states hashed")
            #expect(results.count == 2)
            #expect(results.first { $0.path == good.path }?.failure == nil)
            let failure = try #require(results.first { $0.path == bad.path }?.failure)
            #expect(failure.contains("vmstate") && failure.contains("corrupt"), "\(failure)")
            #expect(await store.lookup(bad.key) == nil, "the corrupt state is removed")
            var checked = stat()
            #expect(stat(good.path, &checked) == 0 && checked.st_mtim.tv_sec == 1_000_000_000, "marked as used")
            #expect(await store.lookup(good.key) != nil, "the good one stays")
        }
    }

    @Test("one server saves a key at a time; an existing entry is not saved again")
    func oneSaver() async throws {
        try await withStore { store, _ in
            let key = StateStore.key(for: "one")
            let first = try #require(try store.beginSaving(key))
            #expect(try store.beginSaving(key) == nil, "the key is being saved by someone else")
            first.abandon()
            #expect(!names(store.directory).contains { $0.contains(".tmp.") }, "an abandoned save leaves nothing")
            try await save(store, key)
            #expect(try store.beginSaving(key) == nil, "the entry exists")
        }
    }

    @Test("a save killed half way is cleaned up by the next save of its key; a lookup never sees it")
    func deadSave() async throws {
        try await withStore { store, _ in
            let key = StateStore.key(for: "dead")
            try FileManager.default.createDirectory(
                atPath: "\(store.directory)/\(key).tmp.abcdef", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(
                atPath: "\(store.directory)/\(key)", withIntermediateDirectories: true)
            try Data("x".utf8).write(to: URL(fileURLWithPath: "\(store.directory)/\(key)/vmstate"))
            #expect(await store.lookup(key) == nil, "an entry without a manifest is not complete")
            try await save(store, key)
            #expect(names(store.directory) == [key, "\(key).lock"])
        }
    }

    @Test("beyond the bound, the least recently used entries are evicted, but not one in use")
    func eviction() async throws {
        try await withStore(maximumEntries: 2) { store, _ in
            let keys = (0..<4).map { StateStore.key(for: "entry \($0)") }
            // Entry 0 is looked up (so pinned: in use by this process) right after it is saved.
            try await save(store, keys[0])
            for key in keys[1...] {
                let builder = try #require(try store.beginSaving(key))
                try Data(key.utf8).write(to: URL(fileURLWithPath: "\(builder.path)/vmstate"))
                try await builder.commit()
                // Distinct modification times for a clear order.
                usleep(20_000)
            }
            let left = names(store.directory).filter { ImageCache.isDigest($0) }
            #expect(left.contains(keys[0]), "the entry in use stays")
            #expect(left.contains(keys[3]), "the newest stays")
            #expect(!left.contains(keys[1]) && !left.contains(keys[2]), "\(left)")
        }
    }

    /// Another server's pin: a shared flock of its own on the manifest.
    func pinElsewhere(_ entry: StateStore.Entry) throws -> Int32 {
        let fd = open(entry.file(StateStore.manifestName), O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0 && flock(fd, LOCK_SH | LOCK_NB) == 0)
        return fd
    }

    /// Its end: unlocked before the close, as the servers do, since a child forked meanwhile by
    /// a test beside this one would hold the lock past a plain close.
    func unpinElsewhere(_ fd: Int32) {
        flock(fd, LOCK_UN)
        close(fd)
    }

    @Test(
        "a state another server uses is not removed by a discard, unless it is corrupt; the last user's discard removes it"
    )
    func discardSparesOthers() async throws {
        try await withStore { store, _ in
            let key = StateStore.key(for: "shared")
            let entry = try await save(store, key)
            let other = try pinElsewhere(entry)
            #expect(!(await store.discard(entry, corrupt: false)), "removed while another server restores from it")
            #expect(await store.lookup(key) == entry)
            unpinElsewhere(other)
            #expect(await store.discard(entry, corrupt: false))
            #expect(await store.lookup(key) == nil)
            // A corrupt one goes even while another server uses it: nobody can restore it.
            let corrupt = try await save(store, key)
            let user = try pinElsewhere(corrupt)
            defer { unpinElsewhere(user) }
            #expect(await store.discard(corrupt, corrupt: true))
            #expect(await store.lookup(key) == nil)
        }
    }

    @Test("a discard of a state rebuilt meanwhile by another server leaves the new one")
    func discardSparesRebuilt() async throws {
        try await withStore { store, _ in
            let key = StateStore.key(for: "rebuilt")
            let old = try await save(store, key, state: "old")
            // Another server found it corrupt, removed it and saved it again.
            #expect(await store.discard(old, corrupt: true))
            let new = try await save(store, key, state: "new")
            #expect(new.digests != old.digests)
            Pins.unpin(new.file(StateStore.manifestName))
            #expect(!(await store.discard(old, corrupt: true)), "the old entry's discard took the new one")
            #expect(await store.lookup(key) == new)
        }
    }

    @Test("a lookup while a removal holds the entry's lock waits for it, and does not return an entry being removed")
    func lookupWaitsForRemoval() async throws {
        try await withStore { store, _ in
            let key = StateStore.key(for: "racing")
            let entry = try await save(store, key)
            Pins.unpin(entry.file(StateStore.manifestName))
            // A removal (eviction or discard) between its check for pins and its rename.
            let removal = try #require(try FileLock.attempt("\(store.directory)/\(key).lock"))
            #expect(!Pins.isInUse(entry.file(StateStore.manifestName)))
            let lookup = Task { await store.lookup(key) }
            try await Task.sleep(for: .milliseconds(300))
            store.remove(entry.path)
            removal.release()
            #expect(await lookup.value == nil, "the lookup pinned an entry that was being removed")
        }
    }

    @Test("a lookup gives up on a lock held for long, and boots instead of waiting without end")
    func lookupGivesUp() async throws {
        try await withStore { store, _ in
            let key = StateStore.key(for: "held")
            let entry = try await save(store, key)
            Pins.unpin(entry.file(StateStore.manifestName))
            let holder = try #require(try FileLock.attempt("\(store.directory)/\(key).lock"))
            let started = ContinuousClock.now
            #expect(await store.lookup(key) == nil)
            #expect(ContinuousClock.now - started >= StateStore.lookupWait)
            holder.release()
            #expect(await store.lookup(key) == entry)
        }
    }
}
