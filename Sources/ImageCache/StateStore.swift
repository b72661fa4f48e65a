import CommandRunner
import Synchronization
import VirtCore

/// Saved VM states, kept in the image cache's `states/` directory so that later servers restore
/// a booted guest instead of booting one.
///
/// An entry is a directory named by its key (a digest of everything that makes the state valid,
/// computed by the backend), holding the backend's files and a `SHA256SUMS` manifest of them:
/// - `KEY/`: complete entries only; the manifest is written last, before the directory gets its
///   name;
/// - `KEY.tmp.XXXXXX/`: an entry being saved, renamed to `KEY` once complete and synced;
/// - `KEY.lock`: flock(2)ed while the entry is saved or removed, so one server saves it and the
///   others go on without waiting;
/// - `removing.old.XXXXXX/`: an entry being removed (renamed first, so never seen half gone).
///
/// Every file is checked against the manifest before each use: a state that does not match is
/// removed, never restored. Beyond ``maximumEntries`` the least recently used entries that no
/// server uses are removed.
public struct StateStore: Sendable {
    /// The `states` directory.
    public let directory: String
    public let maximumEntries: Int
    let runner: any CommandRunner

    public static let manifestName = "SHA256SUMS"

    public init(cacheDirectory: String, maximumEntries: Int = 4, runner: any CommandRunner = SubprocessRunner()) {
        directory = ImageCache.absolute(cacheDirectory) + "/states"
        self.maximumEntries = maximumEntries
        self.runner = runner
    }

    /// The key of the state that `description` (every input that makes it valid, one per line)
    /// describes.
    public static func key(for description: String) -> String {
        SHA256.hexDigest(of: Array(description.utf8))
    }

    /// A complete entry: its directory and what its manifest lists.
    public struct Entry: Sendable, Equatable {
        public let key: String
        public let path: String
        /// File name to SHA-256, from the manifest.
        public let digests: [String: String]

        public func file(_ name: String) -> String { "\(path)/\(name)" }
    }

    /// How long a lookup waits for an entry's lock, which others hold only to check and remove
    /// it (or, briefly, to find it exists): past that, booting is the better use of the time.
    static let lookupWait: Duration = .seconds(10)

    /// The complete entry for `key`, marked as used now, and pinned (a shared flock on its
    /// manifest) so that no other server's eviction or discard removes it while this process
    /// lives; nil when there is none.
    ///
    /// The pin is taken under the entry's lock, which a removal holds from its check for pins to
    /// the entry's rename: without it, a removal could check, this lookup pin, and the removal
    /// then take away an entry about to be restored.
    public func lookup(_ key: String) async -> Entry? {
        let path = "\(directory)/\(key)"
        guard CacheFiles.exists("\(path)/\(Self.manifestName)") else { return nil }
        guard let lock = await lockEntry(key) else {
            log.info("the saved state \(key) stays locked by another server: booting instead")
            return nil
        }
        defer { lock.release() }
        guard let digests = Self.manifest(of: path) else { return nil }
        do throws(VirtError) {
            try Pins.pin("\(path)/\(Self.manifestName)")
        } catch {
            log.warning("cannot use the saved state \(path): \(error.message)")
            return nil
        }
        CacheFiles.touch(path)
        return Entry(key: key, path: path, digests: digests)
    }

    /// The lock of the entry for `key`, waiting up to ``lookupWait`` for it; nil when it stays
    /// taken, or cannot be taken.
    func lockEntry(_ key: String) async -> FileLock? {
        do throws(VirtError) {
            return try await Deadline(after: Self.lookupWait).poll(every: .milliseconds(50)) {
                () throws(VirtError) -> FileLock? in
                try FileLock.attempt("\(directory)/\(key).lock")
            }
        } catch {
            log.warning("cannot lock the saved state \(key): \(error.message)")
            return nil
        }
    }

    /// File name to SHA-256, as the manifest of the entry at `path` lists them; nil without a
    /// readable, well-formed manifest.
    static func manifest(of path: String) -> [String: String]? {
        guard let text = SmallFile.text("\(path)/\(Self.manifestName)", limit: 65536) else { return nil }
        var digests: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", maxSplits: 1)
            guard fields.count == 2, ImageCache.isDigest(String(fields[0])) else { return nil }
            var name = String(fields[1])
            if name.hasPrefix("*") || name.hasPrefix(" ") { name.removeFirst() }
            guard !name.contains("/"), !name.isEmpty else { return nil }
            digests[name] = String(fields[0])
        }
        return digests.isEmpty ? nil : digests
    }

    /// Checks every file of `entry` against its manifest (with coreutils' sha256sum, as cached
    /// images are); throws naming the first file that does not match.
    ///
    /// A file this process verified before is not hashed again while its identity (device,
    /// inode, size, modification and change times) is the same: a server reverting many times
    /// hashes the state once, and any rewrite of the file, in place or by rename, is still seen.
    public func verify(_ entry: Entry) async throws(VirtError) {
        for (name, expected) in entry.digests.sorted(by: { $0.key < $1.key }) {
            let path = entry.file(name)
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw VirtError(.testbedFailure, "the saved state \(path) is missing", errno: errno)
            }
            defer { close(fd) }
            var info = stat()
            let identity = fstat(fd, &info) == 0 ? Self.identity(info, digest: expected) : nil
            if let identity, Self.verified.withLock({ $0[path] == identity }) { continue }
            let actual = try await CacheCommands.sha256(of: fd, path: path, runner: runner)
            guard actual == expected else {
                Self.verified.withLock { $0[path] = nil }
                throw VirtError(
                    .testbedFailure, "the saved state \(path) is corrupt: its SHA-256 is \(actual), not \(expected)")
            }
            if let identity { Self.verified.withLock { $0[path] = identity } }
        }
    }

    /// Files this process hashed and found as their manifest says, by path.
    private static let verified = Mutex<[String: String]>([:])

    static func identity(_ info: stat, digest: String) -> String {
        "\(info.st_dev) \(info.st_ino) \(info.st_size) \(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec) "
            + "\(info.st_ctim.tv_sec).\(info.st_ctim.tv_nsec) \(digest)"
    }

    /// Removes `entry` (a state that failed to restore or verify). A `corrupt` one (its files do
    /// not match its manifest) goes even while other servers use it: their QEMUs keep the files
    /// they opened, and their next lookup boots. One that only failed to load or run here stays
    /// while another server uses it: that one finds out for itself, and the last to fail removes
    /// it. Returns whether it was removed.
    @discardableResult
    public func discard(_ entry: Entry, corrupt: Bool) async -> Bool {
        let manifest = entry.file(Self.manifestName)
        Pins.unpin(manifest)
        guard let lock = await lockEntry(entry.key) else { return false }
        defer { lock.release() }
        // Another server may have replaced it already with a good one: that one stays.
        guard Self.manifest(of: entry.path) == entry.digests else { return false }
        guard corrupt || !Pins.isInUse(manifest) else {
            log.info("the saved state \(entry.path) is in use by another server: left for it")
            return false
        }
        remove(entry.path)
        log.info("removed the saved state \(entry.path)")
        return true
    }

    /// A new entry being saved; ``commit(digests:)`` gives it its name.
    public final class Builder: @unchecked Sendable {
        public let key: String
        /// The temporary directory to write the entry's files into.
        public let path: String
        let store: StateStore
        private var lock: FileLock?

        init(key: String, path: String, store: StateStore, lock: FileLock) {
            self.key = key
            self.path = path
            self.store = store
            self.lock = lock
        }

        deinit { abandon() }

        /// Hashes the files written into ``path``, writes the manifest, syncs, and renames the
        /// directory to the entry's name; the entry is then ready for any server.
        public func commit() async throws(VirtError) {
            guard lock != nil else { throw VirtError(.internalError, "the saved state \(path) was abandoned") }
            var manifest = ""
            for name in try CacheFiles.names(in: path).sorted() {
                let file = "\(path)/\(name)"
                let fd = open(file, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw VirtError(.io, "cannot open \(file)", errno: errno) }
                defer { close(fd) }
                let digest = try await CacheCommands.sha256(of: fd, path: file, runner: store.runner)
                try CacheFiles.sync(fd, file)
                manifest += "\(digest) *\(name)\n"
            }
            try CacheFiles.writeLine(String(manifest.dropLast()), to: "\(path)/\(StateStore.manifestName)")
            CacheFiles.syncDirectory(path)
            try CacheFiles.move(path, to: "\(store.directory)/\(key)")
            CacheFiles.syncDirectory(store.directory)
            lock?.release()
            lock = nil
            store.evict(keeping: key)
        }

        /// Removes what was written; the key stays without an entry.
        public func abandon() {
            guard let lock else { return }
            store.remove(path)
            lock.release()
            self.lock = nil
        }
    }

    /// Starts saving the entry for `key`; nil when it exists already or another server is saving
    /// it (that server's entry serves the next boots).
    public func beginSaving(_ key: String) throws(VirtError) -> Builder? {
        try CacheFiles.makePrivateDirectory(directory)
        guard let lock = try FileLock.attempt("\(directory)/\(key).lock") else { return nil }
        // What a saving server that died left: nobody else holds the lock that guards it.
        for name in (try? CacheFiles.names(in: directory)) ?? [] where name.hasPrefix("\(key).tmp.") {
            remove("\(directory)/\(name)")
        }
        if CacheFiles.exists("\(directory)/\(key)/\(Self.manifestName)") {
            lock.release()
            return nil
        }
        // An entry directory without a manifest is from before the rename guaranteed one.
        if CacheFiles.exists("\(directory)/\(key)") { remove("\(directory)/\(key)") }
        let made: String
        do throws(VirtError) {
            made = try PrivateDirectory.make(in: directory, prefix: "\(key).tmp.")
        } catch {
            lock.release()
            throw error
        }
        return Builder(key: key, path: made, store: self, lock: lock)
    }

    /// Removes the least recently used complete entries beyond ``maximumEntries`` that no server
    /// uses, and entries whose saving server died.
    func evict(keeping: String) {
        let names = (try? CacheFiles.names(in: directory)) ?? []
        // Removals that a killed process did not finish (nobody else uses a renamed entry).
        for name in names where name.hasPrefix("removing.old.") { Self.removeTree("\(directory)/\(name)") }
        var complete: [(key: String, used: Int64)] = []
        for name in names where ImageCache.isDigest(name) && name != keeping {
            let used = CacheFiles.status("\(directory)/\(name)").map(CacheFiles.modificationTime) ?? 0
            complete.append((name, used))
        }
        complete.sort { ($0.used, $0.key) < ($1.used, $1.key) }
        var count = complete.count + 1
        for candidate in complete where count > maximumEntries {
            guard let lock = try? FileLock.attempt("\(directory)/\(candidate.key).lock") else { continue }
            guard !Pins.isInUse("\(directory)/\(candidate.key)/\(Self.manifestName)") else {
                lock.release()
                continue
            }
            remove("\(directory)/\(candidate.key)")
            lock.removeAndRelease()
            count -= 1
            log.info("evicted the saved state \(candidate.key) (least recently used)")
        }
    }

    /// Renames the directory out of the way first, so no reader ever sees half an entry.
    func remove(_ path: String) {
        if let target = try? PrivateDirectory.make(in: directory, prefix: "removing.old.") {
            if rename(path, target) == 0 {
                Self.removeTree(target)
                return
            }
            rmdir(target)
        }
        Self.removeTree(path)
    }

    static func removeTree(_ path: String) {
        for name in (try? CacheFiles.names(in: path)) ?? [] {
            let child = "\(path)/\(name)"
            var info = stat()
            if lstat(child, &info) == 0, info.st_mode & S_IFMT == S_IFDIR {
                removeTree(child)
            } else {
                unlink(child)
            }
        }
        rmdir(path)
    }
}
