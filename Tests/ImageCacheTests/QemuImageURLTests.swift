import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache

/// debusine-virt-qemu given an image URL, as autopkgtest starts it: the built executable on real
/// pipes. No VM boots: `--qemu /bin/true` and stand-in firmware files pass the checks before the
/// banner, and the session ends at end of input before any `open`.
@Suite("debusine-virt-qemu with an image URL")
struct QemuImageURLTests {
    /// A private directory with stand-in firmware files, a cache directory and a TMPDIR.
    struct Setup {
        let root: String
        var cache: String { "\(root)/cache" }
        var tmp: String { "\(root)/tmp" }

        init() throws {
            root = try TestPaths.makeTemporaryDirectory("dv-qemu-url.")
            try FileManager.default.createDirectory(atPath: "\(root)/tmp", withIntermediateDirectories: false)
            for name in ["code.fd", "vars.fd"] {
                #expect(FileManager.default.createFile(atPath: "\(root)/\(name)", contents: Data(count: 4096)))
            }
        }

        /// The server's argv, through `sh` so it runs with umask 000: the cache must be private
        /// even so.
        func argv(_ url: String, sha256: String, cacheDir: Bool = true) -> [String] {
            [
                "/bin/sh", "-c", #"umask 000; exec "$@""#, "sh", TestPaths.executable("debusine-virt-qemu"),
                "--accel", "tcg", "--qemu", "/bin/true", "--efi-code", "\(root)/code.fd", "--efi-vars",
                "\(root)/vars.fd", "--sha256", sha256, url,
            ] + (cacheDir ? ["--cache-dir", cache] : [])
        }
    }

    @Test("a wrong --sha256 fails before the banner: nothing on stdout, non-zero exit, stderr names the mismatch")
    func wrongDigest() async throws {
        let setup = try Setup()
        defer { TestPaths.removeTree(setup.root) }
        let server = try await TestHTTPServer()
        let bytes = try server.add("w.qcow2", size: 64 << 10)
        let wrong = String(repeating: "f", count: 64)
        let process = try ServerProcess(
            setup.argv(server.url("w.qcow2"), sha256: wrong), environment: ["TMPDIR": setup.tmp])
        let status = try await process.wait()
        #expect(server.requests("w.qcow2") == 1)
        await server.stop()
        #expect(status == .exited(1))
        #expect(try await process.readLine() == nil, "nothing may reach stdout")
        #expect(process.standardError.contains("checksum mismatch"), "\(process.standardError)")
        #expect(process.standardError.contains("expected sha256 \(wrong), got \(SHA256.hexDigest(of: bytes))"))
        #expect(TestPaths.contents(of: setup.cache) == [], "no image is kept")
    }

    @Test("two servers given the same image URL at once download it once, both start, and the cache stays private")
    func twoProcesses() async throws {
        let setup = try Setup()
        defer { TestPaths.removeTree(setup.root) }
        let server = try await TestHTTPServer()
        // The server inspects what it downloads: random bytes, but with a GPT and an ESP.
        let bytes = try await TestDisks.randomWithESP("\(setup.root)/t.img", size: 1 << 20)
        try server.add("t.qcow2", bytes: bytes)
        let argv = setup.argv(server.url("t.qcow2", mode: "slow"), sha256: SHA256.hexDigest(of: bytes))
        let first = try ServerProcess(argv, environment: ["TMPDIR": setup.tmp])
        let second = try ServerProcess(argv, environment: ["TMPDIR": setup.tmp])
        for process in [first, second] {
            #expect(try await process.readLine(timeout: .seconds(60)) == "ok", "\(process.standardError)")
            process.closeStandardInput()
            _ = try await process.wait()
        }
        #expect(server.requests("t.qcow2", mode: "slow") == 1, "the second server must wait for the first's download")
        await server.stop()

        let names = TestPaths.contents(of: setup.cache)
        let image = try #require(names.first { $0.hasSuffix(".image") }, "\(names)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: "\(setup.cache)/\(image)")) == Data(bytes))
        let directoryMode = try FileManager.default.attributesOfItem(atPath: setup.cache)[.posixPermissions] as? Int
        #expect(directoryMode == 0o700)
        for name in names {
            let mode = try #require(
                try FileManager.default.attributesOfItem(atPath: "\(setup.cache)/\(name)")[.posixPermissions] as? Int)
            #expect(mode & 0o077 == 0, "\(name) has mode \(String(mode, radix: 8)) under umask 000")
        }
    }

    @Test("without --cache-dir the image is cached in $DEBUSINE_VIRT_CACHE")
    func cacheFromEnvironment() async throws {
        let setup = try Setup()
        defer { TestPaths.removeTree(setup.root) }
        let server = try await TestHTTPServer()
        let bytes = try await TestDisks.randomWithESP("\(setup.root)/e.img", size: 1 << 20)
        try server.add("e.qcow2", bytes: bytes)
        let argv = setup.argv(server.url("e.qcow2"), sha256: SHA256.hexDigest(of: bytes), cacheDir: false)
        let process = try ServerProcess(argv, environment: ["TMPDIR": setup.tmp, "DEBUSINE_VIRT_CACHE": setup.cache])
        #expect(try await process.readLine() == "ok", "\(process.standardError)")
        process.closeStandardInput()
        _ = try await process.wait()
        await server.stop()
        #expect(TestPaths.contents(of: setup.cache).contains { $0.hasSuffix(".image") })
    }

    @Test("a DEBUSINE_VIRT_CACHE_MAX that is not a number of bytes is a usage error before the banner")
    func badCacheMax() async throws {
        let setup = try Setup()
        defer { TestPaths.removeTree(setup.root) }
        let argv = setup.argv("http://127.0.0.1:1/never.qcow2", sha256: String(repeating: "0", count: 64))
        let process = try ServerProcess(argv, environment: ["TMPDIR": setup.tmp, "DEBUSINE_VIRT_CACHE_MAX": "20G"])
        #expect(try await process.wait() == .exited(64))
        #expect(try await process.readLine() == nil)
        #expect(process.standardError.contains("DEBUSINE_VIRT_CACHE_MAX must be a number of bytes, not 20G"))
    }

    @Test("--sha256 with a local image path is a usage error before the banner")
    func digestForLocalPath() async throws {
        let process = try ServerProcess([
            TestPaths.executable("debusine-virt-qemu"), "--sha256", String(repeating: "0", count: 64), "/etc/hostname",
        ])
        #expect(try await process.wait() == .exited(64))
        #expect(try await process.readLine() == nil)
        #expect(process.standardError.contains("--sha256"))
    }
}
