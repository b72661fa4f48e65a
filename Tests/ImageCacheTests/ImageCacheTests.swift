import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache

/// The image cache against a real HTTP server on 127.0.0.1 and real curl and sha256sum.
@Suite("The image cache")
struct ImageCacheTests {
    /// A cache in a fresh directory (a level below the test's directory, so its creation is
    /// tested too), a server, and a runner that counts commands; `body` gets them and cleanup
    /// follows whatever happens.
    func withCache(
        maxBytes: Int64? = nil,
        _ body: (ImageCache, TestHTTPServer, LoopbackRunner) async throws -> Void
    ) async throws {
        let parent = try TestPaths.makeTemporaryDirectory("dv-cache-test.")
        defer { TestPaths.removeTree(parent) }
        let server = try await TestHTTPServer()
        let runner = LoopbackRunner()
        let cache = ImageCache(directory: "\(parent)/cache/images", maxBytes: maxBytes, runner: runner)
        do {
            try await body(cache, server, runner)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }

    func contents(_ path: String) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    func sha256(_ bytes: [UInt8]) -> String { SHA256.hexDigest(of: bytes) }

    /// The error `fetch` throws, or a recorded issue when it does not throw.
    func fetchError(_ cache: ImageCache, _ url: String, sha256: String? = nil) async -> VirtError? {
        do {
            let path = try await cache.fetch(url, sha256: sha256)
            Issue.record("fetching \(url) should have failed but gave \(path)")
            return nil
        } catch {
            return error
        }
    }

    @Test("a URL is downloaded into the cache once: a second fetch is a hit that makes no request")
    func downloadAndHit() async throws {
        try await withCache { cache, server, runner in
            let bytes = try server.add("a.img", size: 100_000)
            let path = try await cache.fetch(server.url("a.img"), sha256: nil)
            #expect(path.hasPrefix(cache.directory + "/"))
            #expect(try contents(path) == bytes)
            #expect(server.requests("a.img") == 1)

            let again = try await cache.fetch(server.url("a.img"), sha256: nil)
            #expect(again == path)
            #expect(server.requests("a.img") == 1, "a cache hit must not download")
            #expect(runner.count("curl") == 1)
        }
    }

    @Test("a redirect is followed and the image is cached under the URL that was asked for")
    func redirect() async throws {
        try await withCache { cache, server, _ in
            let bytes = try server.add("r.img", size: 5000)
            let path = try await cache.fetch(server.url("r.img", mode: "redirect"), sha256: sha256(bytes))
            #expect(try contents(path) == bytes)
            #expect(server.requests("r.img", mode: "redirect") == 1)
            #expect(server.requests("r.img") == 1)
        }
    }

    @Test("two tasks fetching the same URL at once download it once and get the same file")
    func concurrentTasks() async throws {
        try await withCache { cache, server, _ in
            let bytes = try server.add("c.img", size: 200_000)
            let url = server.url("c.img", mode: "slow")
            async let first = cache.fetch(url, sha256: sha256(bytes))
            async let second = cache.fetch(url, sha256: sha256(bytes))
            let (one, two) = try await (first, second)
            #expect(one == two)
            #expect(try contents(one) == bytes)
            #expect(server.requests("c.img", mode: "slow") == 1, "the second task must wait, not download")
        }
    }

    @Test("a matching sha256 is accepted and recorded: a later fetch with it neither downloads nor hashes")
    func digestMatch() async throws {
        try await withCache { cache, server, runner in
            let bytes = try server.add("m.img", size: 300_000)
            let digest = sha256(bytes)
            // Upper case is accepted: digests are often pasted from elsewhere.
            let path = try await cache.fetch(server.url("m.img"), sha256: digest.uppercased())
            #expect(try contents(path) == bytes)
            #expect(runner.hashes == 1)
            let recorded = try String(
                contentsOfFile: path.replacingOccurrences(of: ".image", with: ".sha256"), encoding: .utf8)
            #expect(recorded == digest + "\n")

            #expect(try await cache.fetch(server.url("m.img"), sha256: digest) == path)
            #expect(runner.hashes == 1, "a digest verified before is not computed again")
            #expect(server.requests("m.img") == 1)
        }
    }

    @Test("a cached image fetched without a digest is checked when a sha256 is given later, without a download")
    func digestGivenLater() async throws {
        try await withCache { cache, server, runner in
            let bytes = try server.add("l.img", size: 50_000)
            let path = try await cache.fetch(server.url("l.img"), sha256: nil)
            #expect(runner.hashes == 0)
            #expect(try await cache.fetch(server.url("l.img"), sha256: sha256(bytes)) == path)
            #expect(runner.hashes == 1, "the cached file is checked against the new digest")
            #expect(server.requests("l.img") == 1)
        }
    }

    @Test("a sha256 mismatch is an error naming both digests; nothing is left under the final name, no temporary file")
    func digestMismatch() async throws {
        try await withCache { cache, server, _ in
            let bytes = try server.add("x.img", size: 70_000)
            let wrong = String(repeating: "0", count: 64)
            let error = try #require(await fetchError(cache, server.url("x.img"), sha256: wrong))
            #expect(error.message.contains("checksum mismatch"))
            #expect(error.message.contains(server.url("x.img")))
            #expect(error.message.contains("expected sha256 \(wrong), got \(sha256(bytes))"))
            #expect(TestPaths.contents(of: cache.directory) == [], "no image, no temporary file, no lock file")
        }
    }

    @Test("when the file at a URL changed, its new sha256 downloads it again; a wrong one keeps the old entry")
    func changedUpstream() async throws {
        try await withCache { cache, server, _ in
            let old = try server.add("u.img", size: 40_000)
            let path = try await cache.fetch(server.url("u.img"), sha256: sha256(old))
            cache.release(path)
            let new = try server.add("u.img", size: 40_001)
            #expect(try await cache.fetch(server.url("u.img"), sha256: sha256(new)) == path)
            #expect(try contents(path) == new)
            #expect(server.requests("u.img") == 2)
            cache.release(path)

            let wrong = String(repeating: "a", count: 64)
            let error = try #require(await fetchError(cache, server.url("u.img"), sha256: wrong))
            #expect(error.message.contains("expected sha256 \(wrong), got \(sha256(new))"))
            #expect(try contents(path) == new, "the verified entry survives a failed re-download")
            #expect(TestPaths.contents(of: cache.directory).allSatisfy { !$0.contains(".tmp.") })
        }
    }

    @Test("a cached entry that a running server uses is not replaced when a different sha256 is asked for")
    func inUseNotReplaced() async throws {
        try await withCache { cache, server, _ in
            let old = try server.add("p.img", size: 10_000)
            let path = try await cache.fetch(server.url("p.img"), sha256: sha256(old))
            // Still pinned by this process, as a server's image is for its whole life.
            let new = try server.add("p.img", size: 10_001)
            let error = try #require(await fetchError(cache, server.url("p.img"), sha256: sha256(new)))
            #expect(error.code == .unavailable)
            #expect(error.message.contains("uses it"))
            #expect(try contents(path) == old)
            #expect(server.requests("p.img") == 1)
        }
    }

    @Test("a download cut off half way fails naming the URL and leaves no file at all")
    func halfWay() async throws {
        try await withCache { cache, server, _ in
            try server.add("h.img", size: 1 << 20)
            let url = server.url("h.img", mode: "half")
            let error = try #require(await fetchError(cache, url))
            #expect(error.code == .commandFailed)
            #expect(error.message.hasPrefix("cannot download \(url): "))
            #expect(!error.message.contains("\n"))
            #expect(server.requests("h.img", mode: "half") == 1)
            #expect(TestPaths.contents(of: cache.directory) == [])
        }
    }

    @Test("HTTP 404 is a notFound error naming the URL and the status, and leaves no file")
    func notFound() async throws {
        try await withCache { cache, server, _ in
            let url = server.url("missing.img")
            let error = try #require(await fetchError(cache, url))
            #expect(error.code == .notFound)
            #expect(error.message == "cannot download \(url): HTTP 404 (not found)")
            #expect(TestPaths.contents(of: cache.directory) == [])
        }
    }

    @Test("a refused connection is an error naming the URL and the cause")
    func connectionRefused() async throws {
        try await withCache { cache, _, _ in
            // Port 1 (tcpmux) is not served on any machine these tests run on.
            let url = "http://127.0.0.1:1/image.qcow2"
            let error = try #require(await fetchError(cache, url))
            #expect(error.code == .commandFailed)
            #expect(error.message.hasPrefix("cannot download \(url): "))
            #expect(error.message.contains("onnect"), "\(error.message)")
        }
    }

    @Test("a file:// URL is copied into the cache; a missing file is notFound")
    func fileURL() async throws {
        try await withCache { cache, server, runner in
            let bytes = try server.add("f.img", size: 123_457)
            let path = try await cache.fetch("file://\(server.files)/f.img", sha256: sha256(bytes))
            #expect(path.hasPrefix(cache.directory + "/"))
            #expect(try contents(path) == bytes)
            #expect(runner.count("curl") == 1)

            let error = try #require(await fetchError(cache, "file://\(server.files)/none.img"))
            #expect(error.code == .notFound)
            #expect(error.message.contains("file://\(server.files)/none.img"))
        }
    }

    @Test("least recently used images are evicted beyond the bound; recently used and just fetched ones stay")
    func eviction() async throws {
        // Room for two 1 MiB images and their small files, not three.
        try await withCache(maxBytes: 2_500_000) { cache, server, _ in
            for name in ["a", "b", "c"] { try server.add("\(name).img", size: 1 << 20) }
            func fetch(_ name: String) async throws -> String {
                let path = try await cache.fetch(server.url("\(name).img"), sha256: nil)
                cache.release(path)
                // Use times of distinct values whatever the filesystem's timestamp granularity.
                try await Task.sleep(for: .milliseconds(20))
                return path
            }
            let a = try await fetch("a")
            let b = try await fetch("b")
            #expect(try await fetch("a") == a, "a is now more recently used than b")
            // Someone else's file named like b's entry: not the cache's to remove.
            let foreign = String(b.dropLast(".image".count)) + ".notes"
            #expect(FileManager.default.createFile(atPath: foreign, contents: Data("mine".utf8)))
            let c = try await fetch("c")
            #expect(FileManager.default.fileExists(atPath: a))
            #expect(!FileManager.default.fileExists(atPath: b), "b was the least recently used")
            #expect(FileManager.default.fileExists(atPath: c))
            #expect(TestPaths.contents(of: cache.directory).filter { $0.hasSuffix(".image") }.count == 2)
            let bKey = String(b.split(separator: "/").last?.dropLast(".image".count) ?? "")
            #expect(!bKey.isEmpty)
            #expect(
                TestPaths.contents(of: cache.directory).filter { $0.hasPrefix(bKey) } == ["\(bKey).notes"],
                "b's lock file goes too, a file not the cache's stays")
            #expect(server.requests("a.img") == 1)
        }
    }

    @Test("an image another process has locked is never evicted, even when it is the least recently used")
    func lockedNotEvicted() async throws {
        try await withCache(maxBytes: 1_500_000) { cache, server, _ in
            for name in ["a", "b", "c"] { try server.add("\(name).img", size: 1 << 20) }
            let a = try await cache.fetch(server.url("a.img"), sha256: nil)
            cache.release(a)
            // Another process uses a: a shared flock, as a server holds on its image.
            // --no-fork: flock itself becomes the holder, so killing it leaves nothing behind.
            let holder = try ServerProcess(
                ["/usr/bin/flock", "--no-fork", "--shared", a, "sh", "-c", "echo locked; exec sleep 600"])
            defer { holder.signal(SIGKILL) }
            #expect(try await holder.readLine(timeout: .seconds(60)) == "locked")
            try await Task.sleep(for: .milliseconds(20))
            let b = try await cache.fetch(server.url("b.img"), sha256: nil)
            cache.release(b)
            try await Task.sleep(for: .milliseconds(20))
            let c = try await cache.fetch(server.url("c.img"), sha256: nil)
            holder.signal(SIGKILL)
            _ = try await holder.wait()
            #expect(FileManager.default.fileExists(atPath: a), "a is in use by another process")
            #expect(!FileManager.default.fileExists(atPath: b))
            #expect(FileManager.default.fileExists(atPath: c), "c is the one being returned")
        }
    }

    @Test("the image being returned is kept even when it alone is over the bound")
    func returnedKept() async throws {
        try await withCache(maxBytes: 1000) { cache, server, _ in
            let bytes = try server.add("big.img", size: 100_000)
            let path = try await cache.fetch(server.url("big.img"), sha256: nil)
            #expect(try contents(path) == bytes)
        }
    }

    @Test(
        "the cache directory is made private (0700, missing parents too) and no cache file is group- or world-writable")
    func modes() async throws {
        try await withCache { cache, server, _ in
            let bytes = try server.add("m.img", size: 1000)
            _ = try await cache.fetch(server.url("m.img"), sha256: sha256(bytes))
            for directory in [cache.directory, String(cache.directory.dropLast("/images".count))] {
                let attributes = try FileManager.default.attributesOfItem(atPath: directory)
                #expect((attributes[.posixPermissions] as? Int) == 0o700, "\(directory)")
            }
            let names = TestPaths.contents(of: cache.directory)
            #expect(names.count == 3, "image, digest and lock: \(names)")
            for name in names {
                let attributes = try FileManager.default.attributesOfItem(atPath: "\(cache.directory)/\(name)")
                let mode = try #require(attributes[.posixPermissions] as? Int)
                #expect(mode & 0o022 == 0, "\(name) has mode \(String(mode, radix: 8))")
            }
        }
    }

    @Test("an existing cache directory that others could enter is made private")
    func existingDirectoryTightened() async throws {
        try await withCache { cache, server, _ in
            try FileManager.default.createDirectory(
                atPath: cache.directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
            try server.add("e.img", size: 10)
            _ = try await cache.fetch(server.url("e.img"), sha256: nil)
            let attributes = try FileManager.default.attributesOfItem(atPath: cache.directory)
            #expect((attributes[.posixPermissions] as? Int) == 0o700)
        }
    }

    @Test("temporary files that a killed download left behind are removed by the next fetch of that URL")
    func staleTemporaryFiles() async throws {
        try await withCache { cache, server, _ in
            try server.add("s.img", size: 1000)
            try FileManager.default.createDirectory(atPath: cache.directory, withIntermediateDirectories: true)
            let key = SHA256.hexDigest(of: Array(server.url("s.img").utf8))
            let stale = "\(cache.directory)/\(key).tmp.AbC123"
            #expect(FileManager.default.createFile(atPath: stale, contents: Data([1, 2, 3])))
            let path = try await cache.fetch(server.url("s.img"), sha256: nil)
            #expect(!FileManager.default.fileExists(atPath: stale))
            #expect(path == "\(cache.directory)/\(key).image")
        }
    }

    @Test("a malformed sha256 or a URL of another scheme is a usage error before anything is downloaded")
    func usageErrors() async throws {
        try await withCache { cache, server, runner in
            try server.add("z.img", size: 10)
            let short = try #require(await fetchError(cache, server.url("z.img"), sha256: "abc"))
            #expect(short.code == .usage)
            let ftp = try #require(await fetchError(cache, "ftp://127.0.0.1/z.img"))
            #expect(ftp.code == .usage)
            #expect(runner.count("curl") == 0)
        }
    }

    @Test(
        "the curl argv: fails on HTTP errors, follows redirects, only http/https/file, quiet unless a terminal watches")
    func curlArgv() {
        let quiet = CacheCommands.download("https://example.org/a b.qcow2", to: "/c/k.tmp.1", progress: false)
        #expect(
            quiet.argv == [
                "curl", "--disable", "--fail", "--location", "--proto", "=http,https,file", "--proto-redir",
                "=http,https", "--connect-timeout", "60", "--speed-limit", "1", "--speed-time", "120", "--silent",
                "--show-error", "--write-out", "%{http_code}", "--output", "/c/k.tmp.1", "--",
                "https://example.org/a b.qcow2",
            ])
        let watched = CacheCommands.download("-o/etc/passwd", to: "/c/t", progress: true)
        #expect(watched.arguments.contains("--progress-bar"))
        #expect(!watched.arguments.contains("--silent"))
        // A URL that looks like an option stays a URL: it comes after "--".
        #expect(Array(watched.arguments.suffix(2)) == ["--", "-o/etc/passwd"])
    }

    @Test("curl failures become one-line errors naming the URL, with a code for each kind of cause")
    func curlErrors() {
        let url = "https://h.example/i.qcow2"
        func error(_ status: ProcessStatus, stdout: String = "000", stderr: String) -> VirtError {
            CacheCommands.downloadError(
                url: url, directory: "/",
                result: CommandResult(
                    status: status, standardOutput: Array(stdout.utf8), standardError: Array(stderr.utf8)))
        }
        let gone = error(.exited(22), stdout: "410", stderr: "curl: (22) The requested URL returned error: 410\n")
        #expect(gone == VirtError(.notFound, "cannot download \(url): HTTP 410 (not found)"))
        #expect(error(.exited(22), stdout: "503", stderr: "").message == "cannot download \(url): HTTP 503")
        let write = error(.exited(23), stderr: "progress\ncurl: (23) Failure writing output to destination\n")
        #expect(write == VirtError(.io, "cannot download \(url) into /: Failure writing output to destination"))
        #expect(error(.exited(6), stderr: "").message == "cannot download \(url): unknown host")
        #expect(error(.exited(28), stderr: "").code == .timeout)
        #expect(error(.signaled(9), stderr: "").message.contains("killed by signal 9"))
    }

    @Test("isURL accepts http, https and file URLs in any case, nothing else")
    func isURL() {
        for url in ["http://h/i", "https://h/i", "file:///i", "HTTPS://H/I"] {
            #expect(ImageCache.isURL(url), "\(url)")
        }
        for text in ["/srv/i.qcow2", "i.qcow2", "ftp://h/i", "http:/h", "file:/i", ""] {
            #expect(!ImageCache.isURL(text), "\(text)")
        }
    }

    @Test("the cache directory is DEBUSINE_VIRT_CACHE, else XDG_CACHE_HOME/debusine-virt/images, else ~/.cache/...")
    func defaultDirectory() {
        let all = ["DEBUSINE_VIRT_CACHE": "/d", "XDG_CACHE_HOME": "/x", "HOME": "/h"]
        #expect(ImageCache.defaultDirectory(environment: all) == "/d")
        #expect(
            ImageCache.defaultDirectory(environment: all.merging(["DEBUSINE_VIRT_CACHE": ""]) { $1 })
                == "/x/debusine-virt/images")
        #expect(
            ImageCache.defaultDirectory(environment: ["XDG_CACHE_HOME": "/x", "HOME": "/h"])
                == "/x/debusine-virt/images")
        // The XDG specification says to ignore a relative XDG_CACHE_HOME.
        #expect(
            ImageCache.defaultDirectory(environment: ["XDG_CACHE_HOME": "x", "HOME": "/h"])
                == "/h/.cache/debusine-virt/images")
        #expect(ImageCache.defaultDirectory(environment: ["HOME": "/h"]) == "/h/.cache/debusine-virt/images")
        #expect(ImageCache.defaultDirectory(environment: [:]).hasSuffix("/.cache/debusine-virt/images"))
    }

    @Test("the bound defaults to 20 GiB, and a given bound wins")
    func bound() {
        #expect(ImageCache(directory: "/nonexistent", maxBytes: 5).maxBytes == 5)
        if getenv("DEBUSINE_VIRT_CACHE_MAX") == nil {
            #expect(ImageCache(directory: "/nonexistent").maxBytes == 20 << 30)
        }
        #expect(ImageCache(directory: "relative").directory.hasPrefix("/"), "the directory is made absolute")
    }
}

@Suite("Errors of system calls")
struct SystemCallErrorTests {
    @Test("a failed system call's error keeps its errno and says the system's reason after the message")
    func underlyingErrno() {
        let missing = "/nonexistent-\(getpid())"
        #expect(throws: VirtError(.io, "cannot list the image cache \(missing)", errno: ENOENT)) {
            try CacheFiles.names(in: missing)
        }
        do {
            _ = try CacheFiles.names(in: missing)
            Issue.record("listing a missing directory succeeded")
        } catch {
            #expect(error.underlying == ENOENT)
            #expect(error.message == "cannot list the image cache \(missing): No such file or directory")
        }
        #expect(VirtError(.io, "plain").underlying == nil)
    }
}
