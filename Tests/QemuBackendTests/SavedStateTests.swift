import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// Saved VM states with real VMs: the first boot saves, later opens and reverts restore, and a
/// restored guest is a machine of its own. Two tests: `--no-snapshot` on its own, and the rest as
/// one test in order, because each boot costs half a minute under TCG here: it boots three times
/// (to save, after a corruption, after a failed restore) and restores three times.
@Suite("debusine-virt-qemu saved VM states with real VMs")
struct SavedStateTests {
    let runner = SubprocessRunner()

    /// A directory of the test's own holding its state cache and its servers' TMPDIR; the caller
    /// removes it.
    func workDirectory() throws -> (work: String, cache: String, parent: String) {
        let work = try TestPaths.makeTemporaryDirectory("dv-state-vm.")
        do {
            try FileManager.default.createDirectory(atPath: "\(work)/tmp", withIntermediateDirectories: true)
        } catch {
            TestPaths.removeTree(work)
            throw error
        }
        return (work, "\(work)/cache", "\(work)/tmp")
    }

    /// A server on the test image with its own cache, so this test decides what is saved. With 1
    /// GiB of RAM, not the default 2: each save, verification and check here hashes the whole RAM
    /// file (sparse, but hashed all the same), about seven times in all, and nothing here depends on
    /// the size. With `-d`: a CI run once saw a reply not come for 20 minutes, and a reply that
    /// does not come fails with the end of the server's stderr, which should then say where.
    func server(cache: String, parent: String, _ extra: [String] = []) throws -> ServerProcess {
        let directory = try #require(
            QemuServerTests.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        return try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "-d", "--accel", "tcg", "--network", "none",
                "--boot-timeout",
                "900", "--shutdown-timeout", "10", "--ram-size", "1024", "--cache-dir", cache,
            ] + extra + ["\(directory)/bookworm-amd64.qcow2"],
            environment: ["TMPDIR": parent])
    }

    /// Opens and returns the auxverb; the server must answer `ok`.
    func open(_ server: ServerProcess) async throws -> [String] {
        #expect(try await server.readLine() == "ok")
        let opened = try await server.request("open", timeout: .seconds(1200))
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        return try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
    }

    func run(_ aux: [String], _ argv: [String]) async throws -> String {
        let result = try await runner.run(Command(argv: aux + argv), input: .none, output: .capture, error: .capture)
        #expect(result.status == .exited(0), "\(argv): \(result.errorText)")
        return result.outputText
    }

    func finish(_ server: ServerProcess) async throws {
        #expect(try await server.request("close", timeout: .seconds(120)) == "ok")
        server.write(line: "quit")
        #expect(try await server.wait(timeout: .seconds(120)) == .exited(0), "\(server.standardError)")
    }

    func entries(_ cache: String) -> [String] {
        TestPaths.contents(of: "\(cache)/states").filter { !$0.hasSuffix(".lock") }
    }

    /// What says that one guest is not another: random bytes, a random uuid, the marker file.
    func identity(_ aux: [String]) async throws -> String {
        try await run(aux, ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/uuid"])
    }

    @Test("--no-snapshot boots and saves nothing", .enabled(if: QemuServerTests.enabled), .guestSlot(minutes: 20))
    func noSnapshot() async throws {
        let (work, cache, parent) = try workDirectory()
        defer { TestPaths.removeTree(work) }
        let plain = try server(cache: cache, parent: parent, ["--no-snapshot"])
        let aux = try await open(plain)
        #expect(try await run(aux, ["cat", "/etc/debian_version"]).hasPrefix("12"))
        try await finish(plain)
        #expect(!plain.standardError.contains("saved the VM state"), "\(plain.standardError)")
        #expect(entries(cache).isEmpty, "--no-snapshot saved \(entries(cache))")
        #expect(TestPaths.contents(of: parent) == [], "instance directories left: \(TestPaths.contents(of: parent))")
        let leftover = try await runner.run(Command("pgrep", ["-f", parent]))
        #expect(leftover.outputText.isEmpty, "QEMU processes left behind: \(leftover.outputText)")
    }

    @Test(
        "the first boot saves the VM; opens and reverts restore it into independent guests; a corrupt state is rebuilt, never used",
        .enabled(if: QemuServerTests.enabled), .guestSlot(minutes: 40, ahead: true))
    func savedStates() async throws {
        let (work, cache, parent) = try workDirectory()
        defer { TestPaths.removeTree(work) }

        // The first boot saves; its guest runs on.
        let first = try server(cache: cache, parent: parent)
        let firstAux = try await open(first)
        #expect(first.standardError.contains("saved the VM state"), "\(first.standardError)")
        #expect(entries(cache).count == 1, "\(entries(cache))")
        #expect(try await run(firstAux, ["cat", "/etc/debian_version"]).hasPrefix("12"))
        // A revert restores: what the test wrote is gone, the clock is the host's.
        _ = try await run(firstAux, ["sh", "-c", "echo dirty > /root/marker && sync"])
        let clock = ContinuousClock()
        let reverting = clock.now
        #expect(try await first.request("revert", timeout: .seconds(1200)).hasPrefix("ok /"))
        let revertTime = clock.now - reverting
        #expect(first.standardError.contains("restored the saved VM state"), "\(first.standardError)")
        // The state was saved once the guest had started up: a restored guest does not go on
        // booting while its test runs (on a busy host the helper is up well before that).
        let state = try await runner.run(Command(argv: firstAux + ["systemctl", "is-system-running"]))
        #expect(
            ["running", "degraded"].contains(state.outputText),
            "a restored guest is \(state.outputText):\n\(first.standardError.suffix(4000))")
        #expect(try await runner.run(Command(argv: firstAux + ["test", "-e", "/root/marker"])).status == .exited(1))
        let guestTime = Double(try await run(firstAux, ["date", "+%s"])) ?? 0
        #expect(abs(guestTime - Date().timeIntervalSince1970) < 30, "the restored guest's clock is \(guestTime)")
        print("revert from the saved state took \(revertTime)")

        // Two more servers restore from the same state at once: three guests, nothing shared.
        let second = try server(cache: cache, parent: parent)
        let third = try server(cache: cache, parent: parent)
        async let secondOpened = open(second)
        async let thirdOpened = open(third)
        let (secondAux, thirdAux) = try await (secondOpened, thirdOpened)
        for restored in [first, second, third] {
            #expect(restored.standardError.contains("restored the saved VM state"), "\(restored.standardError)")
            // The helper in each guest set the clock and credited fresh host entropy, reseeding
            // the kernel's generator; without it the guests would start from one random state.
            #expect(restored.standardError.contains("(clock-set reseeded)"), "\(restored.standardError)")
        }
        #expect(Set([firstAux, secondAux, thirdAux].map { $0.last ?? "" }).count == 3, "one socket per server")
        let identities = [
            try await identity(firstAux), try await identity(secondAux), try await identity(thirdAux),
        ]
        // Guests diverge on their own too (timing decides what draws from the generator first),
        // so this cannot prove the reseed; it would catch guests that share their disk or memory.
        #expect(Set(identities).count == 3, "restored guests share random state: \(identities)")
        // Each maps the saved RAM file private: what one writes to its disk or its memory (a
        // tmpfs file lives in the guest's RAM) the others do not see.
        _ = try await run(secondAux, ["sh", "-c", "echo second > /root/mine && echo second > /dev/shm/mine"])
        #expect(try await run(secondAux, ["cat", "/root/mine", "/dev/shm/mine"]) == "second\nsecond")
        for other in [firstAux, thirdAux] {
            #expect(try await runner.run(Command(argv: other + ["test", "-e", "/root/mine"])).status == .exited(1))
            #expect(try await runner.run(Command(argv: other + ["test", "-e", "/dev/shm/mine"])).status == .exited(1))
        }
        // (That a reboot of a restored guest is a real one, the fixture's reboot test shows: its
        // guest is restored by the revert after breaks-testbed, which scripts/main-job and the
        // i386 fixture run in QemuServerTests check.)
        for server in [first, second, third] { try await finish(server) }

        // Three guests ran on the saved RAM and left it as saved.
        let entry = try #require(entries(cache).first)
        let stateFile = "\(cache)/states/\(entry)/ram"
        let saved = try String(contentsOfFile: "\(cache)/states/\(entry)/SHA256SUMS", encoding: .utf8)
        let afterUse = try await runner.run(
            Command("sha256sum", [stateFile]), input: .none, output: .capture, error: .capture)
        #expect(saved.contains("\(afterUse.outputText.prefix(64)) *ram"), "\(saved) against \(afterUse.outputText)")

        // One changed byte in the middle of the saved memory: detected, removed, rebuilt.
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: stateFile))
        let size = try handle.seekToEnd()
        try handle.seek(toOffset: size / 2)
        let byte = try #require(try handle.read(upToCount: 1)?.first)
        try handle.seek(toOffset: size / 2)
        try handle.write(contentsOf: [byte ^ 0xFF])
        try handle.close()
        let fourth = try server(cache: cache, parent: parent)
        let fourthAux = try await open(fourth)
        #expect(fourth.standardError.contains("is corrupt"), "\(fourth.standardError)")
        #expect(!fourth.standardError.contains("restored the saved VM state"), "\(fourth.standardError)")
        #expect(fourth.standardError.contains("saved the VM state"), "\(fourth.standardError)")
        #expect(try await run(fourthAux, ["cat", "/etc/debian_version"]).hasPrefix("12"))
        try await finish(fourth)
        // The rebuilt entry matches its own manifest again.
        let manifest = try String(contentsOfFile: "\(cache)/states/\(entry)/SHA256SUMS", encoding: .utf8)
        let actual = try await runner.run(
            Command("sha256sum", [stateFile]), input: .none, output: .capture, error: .capture)
        let digest = String(actual.outputText.prefix(64))
        #expect(manifest.contains("\(digest) *ram"), "\(manifest) against \(actual.outputText)")

        // A state that fails before its verification has finished (here the EFI variables cannot
        // be copied: the file is a directory now) is no reason to fail the open: it boots, and the
        // verification, left to finish, finds the entry bad and has it rebuilt.
        let efiVars = "\(cache)/states/\(entry)/efivars.fd"
        unlink(efiVars)
        try FileManager.default.createDirectory(atPath: efiVars, withIntermediateDirectories: false)
        let fifth = try server(cache: cache, parent: parent)
        let fifthAux = try await open(fifth)
        #expect(fifth.standardError.contains("cannot restore the saved state"), "\(fifth.standardError)")
        #expect(fifth.standardError.contains("removing it and booting"), "\(fifth.standardError)")
        #expect(fifth.standardError.contains("saved the VM state"), "\(fifth.standardError)")
        #expect(try await run(fifthAux, ["cat", "/etc/debian_version"]).hasPrefix("12"))
        try await finish(fifth)
        var rebuilt = stat()
        #expect(stat(efiVars, &rebuilt) == 0 && rebuilt.st_mode & S_IFMT == S_IFREG, "the entry was not rebuilt")

        #expect(TestPaths.contents(of: parent) == [], "instance directories left: \(TestPaths.contents(of: parent))")
        let leftover = try await runner.run(Command("pgrep", ["-f", parent]))
        #expect(leftover.outputText.isEmpty, "QEMU processes left behind: \(leftover.outputText)")
    }
}
