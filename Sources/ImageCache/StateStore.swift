import CommandRunner
import Synchronization
import VirtCore

/// Saved VM states, kept in the image cache's `states/` directory so that later servers restore
/// a booted guest instead of booting one.
///
/// An entry is a directory named by its key (a digest of everything that makes the state valid,
/// computed by the backend), holding the backend's files, a `SHA256SUMS` manifest of them, and
/// `IDENTITIES`, what each file looked like when it was saved:
/// - `KEY/`: complete entries only; the manifest is written last, before the directory gets its
///   name;
/// - `KEY.tmp.XXXXXX/`: an entry being saved, renamed to `KEY` once complete and synced;
/// - `KEY.lock`: flock(2)ed while the entry is saved or removed, so one server saves it and the
///   others go on without waiting;
/// - `removing.old.XXXXXX/`: an entry being removed (renamed first, so never seen half gone).
///
/// Every file is checked before each use: a state that does not match is removed, never restored.
/// A file whose size, inode, and modification and change times (in ns) are still those recorded
/// at save time is taken as saved: any write, truncation or replacement changes its change time,
/// which no one can set back. Hashing a 230 MB state took 0.9 s of CPU at every `open`. Any other
/// file (changed, copied from another machine, saved before the record existed) is hashed against
/// the manifest; ``checkAll()`` hashes every file of every entry, for an admin's explicit check.
///
/// Beyond ``maximumEntries`` the least recently used entries that no server uses are removed.
public struct StateStore: Sendable {
    /// The `states` directory.
    public let directory: String
    public let maximumEntries: Int
    let runner: any CommandRunner

    public static let manifestName = "SHA256SUMS"
    public static let identitiesName = "IDENTITIES"

    /// 8 by default: a worker with images of two architectures and a few option sets each (each
    /// a state) would otherwise boot some of them at every use. An entry holds the RAM the
    /// guest touched, about 230-280 MB here.
    public init(cacheDirectory: String, maximumEntries: Int = 8, runner: any CommandRunner = SubprocessRunner()) {
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
        /// File name to what the file looked like when it was saved (``StateStore/identity(_:)``);
        /// empty for an entry saved before these were recorded.
        public let recorded: [String: String]

        public func file(_ name: String) -> String { "\(path)/\(name)" }
    }

    /// How long a lookup waits for an entry's lock, which others hold only to check and remove
    /// it (or, briefly, to find it exists): past that, booting is the better use of the time.
    static let lookupWait: Duration = .seconds(10)

    /// The complete entry for `key`, marked as used now (unless not `markingUsed`), and pinned (a
    /// shared flock on its manifest) so that no other server's eviction or discard removes it
    /// while this process lives; nil when there is none.
    ///
    /// The pin is taken under the entry's lock, which a removal holds from its check for pins to
    /// the entry's rename: without it, a removal could check, this lookup pin, and the removal
    /// then take away an entry about to be restored.
    public func lookup(_ key: String, markingUsed: Bool = true) async -> Entry? {
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
        if markingUsed { CacheFiles.touch(path) }
        return Entry(key: key, path: path, digests: digests, recorded: Self.identities(of: path))
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

    /// File name to identity, as `IDENTITIES` in the entry at `path` lists them (`SIZE INODE
    /// MTIME CTIME NAME` per line); empty when it is missing or not well-formed.
    static func identities(of path: String) -> [String: String] {
        guard let text = SmallFile.text("\(path)/\(Self.identitiesName)", limit: 65536) else { return [:] }
        var identities: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", maxSplits: 4)
            guard fields.count == 5 else { return [:] }
            identities[String(fields[4])] = fields[0..<4].joined(separator: " ")
        }
        return identities
    }

    /// A file's size, inode, and modification and change times in ns.
    static func identity(_ info: stat) -> String {
        "\(info.st_size) \(info.st_ino) \(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec) "
            + "\(info.st_ctim.tv_sec).\(info.st_ctim.tv_nsec)"
    }

    /// Checks every file of `entry`; throws naming the first file that does not match.
    ///
    /// A file is hashed (as cached images are, by openssl or sha256sum) and compared with the
    /// manifest unless it is as it was saved (its recorded identity), or, with `thoroughly`
    /// false, unless this process hashed it before and it has not changed since (device and
    /// identity): a server reverting many times hashes a state from elsewhere once. With
    /// `thoroughly`, every file is hashed. An entry that passes with files not as recorded (saved
    /// before the record existed, or copied from another machine) gets a new record.
    public func verify(_ entry: Entry, thoroughly: Bool = false) async throws(VirtError) {
        var found: [String: String] = [:]
        for (name, expected) in entry.digests.sorted(by: { $0.key < $1.key }) {
            let path = entry.file(name)
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw VirtError(.testbedFailure, "the saved state \(path) is missing", errno: errno)
            }
            defer { close(fd) }
            var info = stat()
            let current = fstat(fd, &info) == 0 ? Self.identity(info) : nil
            let identity = current.map { "\(info.st_dev) \($0) \(expected)" }
            found[name] = current
            if !thoroughly, let current, entry.recorded[name] == current { continue }
            if !thoroughly, let identity, Self.verified.withLock({ $0[path] == identity }) { continue }
            let actual = try await CacheCommands.sha256(of: fd, path: path, runner: runner)
            guard actual == expected else {
                Self.verified.withLock { $0[path] = nil }
                throw VirtError(
                    .testbedFailure, "the saved state \(path) is corrupt: its SHA-256 is \(actual), not \(expected)")
            }
            if let identity { Self.verified.withLock { $0[path] = identity } }
        }
        if found != entry.recorded && found.count == entry.digests.count { record(found, in: entry) }
    }

    /// Records `identities`, read before the files of `entry` were found to match its manifest,
    /// as the entry's `IDENTITIES`, unless another server holds the entry (it may be replacing
    /// it). A file changed since then has another change time, and is hashed again.
    private func record(_ identities: [String: String], in entry: Entry) {
        guard let lock = try? FileLock.attempt("\(directory)/\(entry.key).lock") else { return }
        defer { lock.release() }
        guard Self.manifest(of: entry.path) == entry.digests else { return }
        let text = identities.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: "\n")
        do throws(VirtError) {
            try CacheFiles.writeLine(text, to: entry.file(Self.identitiesName))
        } catch {
            log.debug("cannot record what the saved state \(entry.path) holds: \(error.message)")
        }
    }

    /// Files this process hashed and found as their manifest says, by path.
    private static let verified = Mutex<[String: String]>([:])

    /// What ``checkAll()`` found for one entry.
    public struct CheckResult: Sendable, Equatable {
        public let path: String
        /// Nil when every file matched; otherwise why not (the entry is then removed).
        public let failure: String?
    }

    /// Hashes every file of every complete entry against its manifest, whatever was recorded,
    /// and removes the entries that do not match, even while servers use them (as a corrupt
    /// state found at `open` is). An entry that another server holds locked for longer than a
    /// lookup waits is not checked, and not listed.
    public func checkAll() async -> [CheckResult] {
        var results: [CheckResult] = []
        for key in ((try? CacheFiles.names(in: directory)) ?? []).sorted() where ImageCache.isDigest(key) {
            // A check is no use: it leaves the order of eviction as it was.
            guard let entry = await lookup(key, markingUsed: false) else { continue }
            do throws(VirtError) {
                try await verify(entry, thoroughly: true)
                Pins.unpin(entry.file(Self.manifestName))
                results.append(CheckResult(path: entry.path, failure: nil))
            } catch {
                await discard(entry, corrupt: true)
                results.append(CheckResult(path: entry.path, failure: error.message))
            }
        }
        return results
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
            var identities = ""
            for name in try CacheFiles.names(in: path).sorted() {
                let file = "\(path)/\(name)"
                let fd = open(file, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw VirtError(.io, "cannot open \(file)", errno: errno) }
                defer { close(fd) }
                // Synced first: the hash then reads what the disk holds, and the holes it skips
                // are found in data no longer waiting to be written.
                try CacheFiles.sync(fd, file)
                let digest = try await CacheCommands.sha256(of: fd, path: file, runner: store.runner)
                manifest += "\(digest) *\(name)\n"
                // Read after the file's last write; the rename below changes the directory only.
                var info = stat()
                guard fstat(fd, &info) == 0 else { throw VirtError(.io, "cannot stat \(file)", errno: errno) }
                identities += "\(StateStore.identity(info)) \(name)\n"
            }
            try CacheFiles.writeLine(String(identities.dropLast()), to: "\(path)/\(StateStore.identitiesName)")
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
