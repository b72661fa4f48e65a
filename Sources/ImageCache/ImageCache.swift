import CommandRunner
import VirtCore

/// A per-user cache of system images downloaded from URLs, shared by concurrent servers.
///
/// An entry is named by the SHA-256 of its URL (`KEY`) and made of, in ``directory``:
/// - `KEY.image`: the downloaded file, complete and (if a digest was given) verified;
/// - `KEY.sha256`: the digest it was verified against, so a later fetch with the same digest
///   need not read the whole image again;
/// - `KEY.lock`: flock(2)ed while the entry is downloaded, checked or removed, so concurrent
///   servers download once: the others wait, then use the result;
/// - `KEY.tmp.XXXXXX`: a download in progress, renamed to `KEY.image` only once complete, synced
///   and verified; a failed download removes it.
///
/// Each fetched entry stays in use (a shared flock on it) until the process ends, because a
/// server boots from it again on every revert. Beyond ``maxBytes`` on disk, the least recently
/// used entries that nobody uses or downloads are removed after each fetch.
public struct ImageCache: Sendable {
    /// Where the entries live; created with mode 0700 on the first fetch.
    public let directory: String
    /// The bound on the bytes the entries occupy on disk.
    public let maxBytes: Int64
    let runner: any CommandRunner
    /// A bad `DEBUSINE_VIRT_CACHE_MAX`, reported by the first fetch (the initializer cannot throw).
    let configurationError: VirtError?
    /// Whether curl draws a progress bar on stderr.
    let showsProgress: Bool

    /// The default bound when neither `maxBytes` nor `DEBUSINE_VIRT_CACHE_MAX` gives one: 20 GiB.
    public static let defaultMaxBytes: Int64 = 20 << 30

    /// A cache in `directory` (default ``defaultDirectory(environment:)``) bounded to `maxBytes`
    /// (default `DEBUSINE_VIRT_CACHE_MAX`, in bytes, else ``defaultMaxBytes``).
    public init(directory: String? = nil, maxBytes: Int64? = nil, runner: any CommandRunner = SubprocessRunner()) {
        let environment = Self.environment()
        self.directory = Self.absolute(directory ?? Self.defaultDirectory(environment: environment))
        self.runner = runner
        // Only a person at a terminal wants a progress bar; a log file does not.
        self.showsProgress = isatty(2) == 1
        if let maxBytes {
            self.maxBytes = maxBytes
            configurationError = nil
        } else if let text = environment["DEBUSINE_VIRT_CACHE_MAX"], !text.isEmpty {
            let parsed = Int64(text).flatMap { $0 >= 0 ? $0 : nil }
            self.maxBytes = parsed ?? Self.defaultMaxBytes
            configurationError =
                parsed == nil
                ? VirtError(.usage, "DEBUSINE_VIRT_CACHE_MAX must be a number of bytes, not \(text)") : nil
        } else {
            self.maxBytes = Self.defaultMaxBytes
            configurationError = nil
        }
    }

    /// `$DEBUSINE_VIRT_CACHE`, else `$XDG_CACHE_HOME/debusine-virt/images`, else
    /// `$HOME/.cache/debusine-virt/images` (an unset or empty variable counts as absent, and a
    /// relative XDG_CACHE_HOME is ignored as the XDG specification asks).
    public static func defaultDirectory(environment: [String: String]) -> String {
        if let explicit = environment["DEBUSINE_VIRT_CACHE"], !explicit.isEmpty { return explicit }
        if let xdg = environment["XDG_CACHE_HOME"], xdg.hasPrefix("/") { return "\(xdg)/debusine-virt/images" }
        let home = environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? homeFromPasswd() ?? "/"
        return "\(home)/.cache/debusine-virt/images"
    }

    /// Whether `string` is a URL the cache fetches: http://, https:// or file://.
    public static func isURL(_ string: String) -> Bool {
        let lower = string.lowercased()
        return ["http://", "https://", "file://"].contains { lower.hasPrefix($0) }
    }

    /// Whether `string` is a SHA-256 digest: 64 hexadecimal digits.
    public static func isDigest(_ string: String) -> Bool {
        string.utf8.count == 64 && string.allSatisfy(\.isHexDigit)
    }

    /// Returns the local path of the cached, verified file.
    ///
    /// Downloads `url` unless the cache has it; waits when another process (or task) is
    /// downloading it. With `sha256`, the file is verified before it gets its final name, and a
    /// cached file verified against another digest (or none) is checked again; one that does
    /// not match is downloaded anew. The entry is then in use by this process until it ends.
    ///
    /// `check`, when given, looks at the file before it is used (``ImageInspection``, for one):
    /// a download it refuses is never kept, and a cached file it refuses is removed unless a
    /// running server uses it. Either way the error is rethrown.
    public func fetch(_ url: String, sha256: String?, check: ImageCheck? = nil) async throws(VirtError) -> String {
        if let configurationError { throw configurationError }
        guard Self.isURL(url) else {
            throw VirtError(.usage, "\(url) is not an http://, https:// or file:// URL")
        }
        let expected = sha256?.lowercased()
        if let expected, !Self.isDigest(expected) {
            throw VirtError(.usage, "the sha256 for \(url) must be 64 hexadecimal digits, not \(expected)")
        }
        try CacheFiles.makePrivateDirectory(directory)
        let key = SHA256.hexDigest(of: Array(url.utf8))
        let entry = Entry(directory: directory, key: key)

        let lock = try await FileLock.acquire(entry.lock) {
            log.info("waiting for another debusine-virt to download \(url)")
        }
        do throws(VirtError) {
            let downloaded = try await fill(entry, from: url, expected: expected, check: check)
            if !downloaded, let check { try await checkCached(entry, check) }
            CacheFiles.touch(entry.image)
            try Pins.pin(entry.image)
            lock.release()
        } catch {
            if CacheFiles.exists(entry.image) { lock.release() } else { lock.removeAndRelease() }
            throw error
        }
        evict(keeping: key)
        return entry.image
    }

    /// Ends this process's use of an entry returned by ``fetch(_:sha256:)``, so that eviction
    /// may remove it. A server never calls this: its use ends with the process.
    public func release(_ path: String) {
        Pins.unpin(path)
    }

    /// Checks a cached image (it may have been cached by a version that did not check, or by a
    /// caller with another check) and removes it when refused, unless it is in use. A check that
    /// could not be made (a timeout, qemu-img missing, a full disk) keeps the image: it is
    /// fine as far as anyone knows, and costly to download again.
    private func checkCached(_ entry: Entry, _ check: ImageCheck) async throws(VirtError) {
        do throws(VirtError) {
            try await check(entry.image)
        } catch {
            if error.code == .badImage && !Pins.isInUse(entry.image) {
                CacheFiles.remove(entry.digest)
                CacheFiles.remove(entry.image)
            }
            throw error
        }
    }

    /// Makes `entry.image` the verified content of `url`; the caller holds the entry's lock.
    /// Returns whether it was downloaded now, and so checked by `check` already.
    private func fill(
        _ entry: Entry, from url: String, expected: String?, check: ImageCheck?
    ) async throws(VirtError)
        -> Bool
    {
        // Leftovers of a download that was killed (which no cleanup could reach).
        for name in try CacheFiles.names(in: directory) where entry.isTemporary(name) {
            CacheFiles.remove("\(directory)/\(name)")
        }
        if CacheFiles.exists(entry.image) {
            guard let expected else {
                log.debug("image cache hit for \(url): \(entry.image)")
                return false
            }
            if CacheFiles.readLine(entry.digest) == expected {
                log.debug("image cache hit for \(url), verified before: \(entry.image)")
                return false
            }
            let actual = try await hash(entry.image)
            if actual == expected {
                record(expected, for: entry)
                log.debug("image cache hit for \(url), verified now: \(entry.image)")
                return false
            }
            // The file at the URL changed since it was cached: fetch it again, unless a running
            // server still boots from the old one, which must not change under it.
            guard !Pins.isInUse(entry.image) else {
                throw VirtError(
                    .unavailable,
                    "the cached \(url) has sha256 \(actual), not \(expected), and a running server uses it: "
                        + "try again once it has finished")
            }
            log.info("the cached \(url) does not match sha256 \(expected): downloading it again")
        }
        try await download(url, into: entry, expected: expected, check: check)
        return true
    }

    /// Downloads to a temporary file, syncs, verifies and checks it, then renames it into place.
    private func download(
        _ url: String, into entry: Entry, expected: String?, check: ImageCheck?
    ) async throws(VirtError) {
        let (fd, temporary) = try TemporaryFile.make(prefix: entry.temporaryPrefix)
        // A check that could not be made (not a refusal) keeps the verified download as an
        // entry, which the next fetch checks again; this fetch still fails with it.
        var unchecked: VirtError?
        do throws(VirtError) {
            let command = CacheCommands.download(url, to: temporary, progress: showsProgress)
            if showsProgress { log.info("downloading \(url)") }
            let result: CommandResult
            do throws(VirtError) {
                result = try await runner.run(
                    command, input: .none, output: .capture, error: showsProgress ? .standardError : .capture)
            } catch {
                guard await Executables.exist("curl") else {
                    throw VirtError(.unavailable, "curl is needed to download \(url): apt-get install curl")
                }
                throw error
            }
            guard result.status.succeeded else {
                throw CacheCommands.downloadError(url: url, directory: directory, result: result)
            }
            try CacheFiles.sync(fd, temporary)
            if let expected {
                let actual = try await CacheCommands.sha256(of: fd, path: temporary, runner: runner)
                guard actual == expected else {
                    throw VirtError(.io, "checksum mismatch for \(url): expected sha256 \(expected), got \(actual)")
                }
            }
            // Before the rename: a refused image never becomes an entry another server could use.
            do throws(VirtError) {
                try await check?(temporary)
            } catch  where error.code != .badImage {
                unchecked = error
            }
            // A digest recorded for the previous content must not outlive it, even by a crash.
            CacheFiles.remove(entry.digest)
            try CacheFiles.move(temporary, to: entry.image)
            close(fd)
            CacheFiles.syncDirectory(directory)
        } catch {
            close(fd)
            CacheFiles.remove(temporary)
            throw error
        }
        if let expected { record(expected, for: entry) }
        if let unchecked { throw unchecked }
    }

    /// Records the digest `entry.image` was verified against. Only saves a later fetch the
    /// hashing: the image is in place whether or not this works, so a failure is a warning.
    private func record(_ digest: String, for entry: Entry) {
        do throws(VirtError) {
            try CacheFiles.writeLine(digest, to: entry.digest)
        } catch {
            log.warning("\(error.message)")
        }
    }

    private func hash(_ path: String) async throws(VirtError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw VirtError(.io, "cannot open \(path)", errno: errno) }
        defer { close(fd) }
        return try await CacheCommands.sha256(of: fd, path: path, runner: runner)
    }

    /// Removes the least recently used entries until the cache fits in ``maxBytes``, skipping the
    /// entry `keeping` and every entry another process downloads or uses. Never fails: a cache
    /// over its bound is better than a server that does not start.
    func evict(keeping: String) {
        let names: [String]
        do throws(VirtError) {
            names = try CacheFiles.names(in: directory)
        } catch {
            log.warning("cannot evict old images: \(error.message)")
            return
        }
        var keys = Set<String>()
        for name in names {
            if let dot = name.firstIndex(of: "."), Self.isDigest(String(name[..<dot])),
                Entry(directory: directory, key: String(name[..<dot])).owns(name)
            {
                keys.insert(String(name[..<dot]))
            }
        }
        var candidates: [(key: String, used: Int64, bytes: Int64)] = []
        var total: Int64 = 0
        for key in keys {
            let entry = Entry(directory: directory, key: key)
            let bytes = names.filter { entry.owns($0) }
                .compactMap { CacheFiles.status("\(directory)/\($0)") }
                .reduce(Int64(0)) { $0 + CacheFiles.diskUsage($1) }
            total += bytes
            guard key != keeping else { continue }
            // Entries without an image are dead downloads: the oldest of all, removed first.
            let used = CacheFiles.status(entry.image).map(CacheFiles.modificationTime) ?? Int64.min
            candidates.append((key, used, bytes))
        }
        candidates.sort { ($0.used, $0.key) < ($1.used, $1.key) }
        for candidate in candidates {
            let entry = Entry(directory: directory, key: candidate.key)
            let deadDownload = candidate.used == Int64.min
            guard total > maxBytes || deadDownload else { break }
            // Try-lock only: an entry being downloaded or checked is busy, not ours to remove.
            guard let lock = try? FileLock.attempt(entry.lock) else { continue }
            guard !Pins.isInUse(entry.image) else {
                lock.release()
                continue
            }
            let removing = (try? CacheFiles.names(in: directory)) ?? []
            for name in removing where entry.owns(name) {
                CacheFiles.remove("\(directory)/\(name)")
            }
            lock.removeAndRelease()
            total -= candidate.bytes
            if !deadDownload { log.info("evicted \(entry.image) from the image cache (least recently used)") }
        }
        if total > maxBytes {
            log.debug("the image cache \(directory) holds \(total) bytes, over its bound of \(maxBytes): in use")
        }
    }

    /// The environment variables the cache reads, as a dictionary (which tests can fake).
    static func environment() -> [String: String] {
        var result: [String: String] = [:]
        for name in ["DEBUSINE_VIRT_CACHE", "DEBUSINE_VIRT_CACHE_MAX", "XDG_CACHE_HOME", "HOME"] {
            if let value = getenv(name) { result[name] = String(cString: value) }
        }
        return result
    }

    static func homeFromPasswd() -> String? {
        guard let entry = getpwuid(geteuid()), let directory = entry.pointee.pw_dir else { return nil }
        return String(cString: directory)
    }

    static func absolute(_ path: String) -> String { AbsolutePath.of(path) }
}

/// Looks at a file the cache is about to hand out and throws when it must not be used.
public typealias ImageCheck = @Sendable (String) async throws(VirtError) -> Void

/// The file names of one cache entry.
struct Entry {
    let directory: String
    let key: String

    var image: String { "\(directory)/\(key).image" }
    var digest: String { "\(directory)/\(key).sha256" }
    var lock: String { "\(directory)/\(key).lock" }
    /// Downloads in progress, and the digest file while it is rewritten, have names starting so.
    var temporaryPrefix: String { "\(directory)/\(key).tmp." }

    /// Whether `name` (in the cache directory) is one of this entry's own files, the lock
    /// aside: eviction removes only those, whatever else someone put beside them.
    func owns(_ name: String) -> Bool {
        name == "\(key).image" || name == "\(key).sha256" || name.hasPrefix("\(key).tmp.")
    }

    func isTemporary(_ name: String) -> Bool {
        name.hasPrefix(key + ".") && name.contains(".tmp.")
    }
}
