import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache

@Suite("SHA-256")
struct SHA256Tests {
    @Test(
        "the FIPS 180 and NIST example messages give their published digests",
        arguments: [
            ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            (
                "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
            ),
            (
                "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
                    + "mnopqrstnopqrstu",
                "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"
            ),
        ])
    func vectors(_ message: String, _ digest: String) {
        #expect(SHA256.hexDigest(of: Array(message.utf8)) == digest)
    }

    @Test("a million times 'a', fed in uneven pieces, gives the published digest")
    func millionA() async {
        let digest = await onOwnThread {
            var hash = SHA256()
            var fed = 0
            var piece = 1
            while fed < 1_000_000 {
                let count = min(piece, 1_000_000 - fed)
                hash.update(repeatElement(UInt8(ascii: "a"), count: count))
                fed += count
                piece = piece * 3 % 1000 + 1
            }
            return hash.hexDigest()
        }
        #expect(digest == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    @Test("every length around the block and padding boundaries agrees with sha256sum")
    func boundaries() async throws {
        let runner = SubprocessRunner()
        let bytes = (0..<130).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        for length in [55, 56, 57, 63, 64, 65, 119, 120, 128, 130] {
            let message = Array(bytes.prefix(length))
            let expected = try await runner.check(Command("sha256sum"), input: .bytes(message))
            #expect(SHA256.hexDigest(of: message) == String(expected.prefix(64)), "length \(length)")
        }
    }

    @Test("8 MiB of random bytes fed in odd chunks agrees with sha256sum of the same file")
    func bigFile() async throws {
        let directory = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(directory) }
        let bytes = await onOwnThread {
            var generator = SystemRandomNumberGenerator()
            return (0..<(8 << 20)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: "\(directory)/big"))
        let digest = await onOwnThread {
            var hash = SHA256()
            var offset = 0
            while offset < bytes.count {
                let end = min(offset + 1_000_003, bytes.count)
                bytes[offset..<end].withUnsafeBytes { hash.update($0) }
                offset = end
            }
            return hash.hexDigest()
        }
        let expected = try await SubprocessRunner().check(Command("sha256sum", ["\(directory)/big"]))
        #expect(digest == String(expected.prefix(64)))
    }

    /// A sparse file of `size` bytes with `extents` written (data, or zeros written as data).
    func sparseFile(_ path: String, size: off_t, _ extents: [(off_t, [UInt8])]) throws {
        let out = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        try #require(out >= 0)
        defer { close(out) }
        try #require(ftruncate(out, size) == 0)
        for (offset, data) in extents {
            let written = data.withUnsafeBytes { pwrite(out, $0.baseAddress, $0.count, offset) }
            try #require(written == data.count)
        }
    }

    /// Holes and data, as in a saved VM's RAM file: data at the start, across the feed's 1 MiB
    /// chunks, written as zeros, and in the last byte; or ending in a hole, at a size that is no
    /// multiple of a block.
    static let sparseLayouts: [(size: off_t, lastByte: Bool)] = [(64 << 20, true), ((64 << 20) + 1234, false)]

    @Test(
        "a sparse file's digest is sha256sum's, its holes fed as zeros and its data as read, computed by openssl when it is installed",
        arguments: sparseLayouts)
    func sparseFileByOpenSSL(size: off_t, lastByte: Bool) async throws {
        let directory = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(directory) }
        let path = "\(directory)/ram"
        let ramp: [UInt8] = (0..<(1 << 20) + 20).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var extents: [(off_t, [UInt8])] = [
            (0, [UInt8](repeating: 7, count: 5000)), ((16 << 20) - 10, ramp),
            (40 << 20, [UInt8](repeating: 0, count: 70_000)),
        ]
        if lastByte { extents.append((size - 1, [1])) }
        try sparseFile(path, size: size, extents)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        var info = stat()
        #expect(fstat(fd, &info) == 0 && SparseFeed.isWorthIt(info), "not sparse here: \(info.st_blocks) blocks")
        let runner = LoopbackRunner()
        let digest = try await CacheCommands.sha256(of: fd, path: path, runner: runner)
        let expected = try await SubprocessRunner().check(Command("sha256sum", [path]))
        #expect(digest == String(expected.prefix(64)))
        if await Executables.exist("openssl") {
            #expect(runner.count("openssl") == 1 && runner.count("sha256sum") == 0)
        } else {
            #expect(!TestPaths.isCI, "openssl is missing (scripts/setup-host installs it)")
            #expect(runner.count("sha256sum") == 1)
        }
    }

    /// A runner that starts nothing and says the command succeeded, printing a digest: a hasher
    /// that never read its input, as when a spawn fails after the runner took the input.
    struct UnreadingRunner: CommandRunner {
        func run(
            _ command: Command, input: CommandInput, output: CommandOutput, error: CommandOutput
        ) async throws(VirtError) -> CommandResult {
            CommandResult(status: .exited(0), standardOutput: Array(String(repeating: "0", count: 64).utf8))
        }
    }

    @Test("a hasher that never reads a sparse file fails the hash, instead of leaving its feed blocked for ever")
    func unreadFeed() async throws {
        let directory = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(directory) }
        let path = "\(directory)/ram"
        // More than the pipe holds, so that the feed is still writing when the reader is gone.
        try sparseFile(path, size: 64 << 20, [(32 << 20, [UInt8](repeating: 9, count: 4 << 20))])
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        do throws(VirtError) {
            let digest = try await withTimeout(.seconds(60), "the hash") {
                try await CacheCommands.sha256(of: fd, path: path, runner: UnreadingRunner())
            }
            Issue.record("a hash of nothing read gave \(digest)")
        } catch {
            #expect(error.code != .timeout, "\(error.message)")
        }
    }
}
