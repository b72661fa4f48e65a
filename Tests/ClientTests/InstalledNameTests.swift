import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// The README's command lines after its install step: autopkgtest finds the servers by their
/// bare names (through the autopkgtest-virt-* aliases), and uninstalling removes everything.
@Suite("The installed servers, by the names users type")
struct InstalledNameTests {
    let runner = SubprocessRunner()

    /// autopkgtest of examples/hello with `-- SERVER ARGS...`; the test must pass.
    func autopkgtest(_ server: [String]) async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-installed.")
        defer { TestPaths.removeTree(work) }
        let result = try await runner.run(
            Command(
                "autopkgtest",
                [
                    "--no-built-binaries", "--summary-file=\(work)/summary",
                    "\(TestPaths.repositoryRoot)/examples/hello/", "--",
                ]
                    + server,
                environment: ["PATH": try Installed.path()]),
            input: .none, output: .discard, error: .capture(limit: 16 << 20))
        #expect(result.status == .exited(0), "autopkgtest: \(result.status)\n\(result.errorText.suffix(3000))")
        let summary = try String(contentsOfFile: "\(work)/summary", encoding: .utf8)
        #expect(summary.split(separator: " ", omittingEmptySubsequences: true).prefix(2) == ["command1", "PASS\n"])
        #expect(result.errorText.contains("hello from "), "the test ran in the testbed")
    }

    @Test(
        "autopkgtest SRC -- debusine-virt-incus artifact/1 works with the installed name",
        .enabled(if: Installed.canRunIncus), .timeLimit(.minutes(5)))
    func incus() async throws {
        let image = try #require(Installed.incusImage, "DEBUSINE_VIRT_INCUS_IMAGE is not set: run through scripts/test")
        try await autopkgtest(["debusine-virt-incus", image])
    }

    @Test(
        "autopkgtest SRC -- debusine-virt-qemu IMAGE works with the installed name",
        .enabled(if: Installed.canRunQemu), .guestSlot(minutes: 10))
    func qemu() async throws {
        let images = try #require(
            Installed.qemuImages, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        try await autopkgtest([
            "debusine-virt-qemu", "--accel", "tcg", "--network", "none", "--boot-timeout", "900",
            "\(images)/bookworm-amd64.qcow2",
        ])
    }

    @Test(
        "the install put programs, aliases and man pages in place; --uninstall removes them all",
        .enabled(if: Installed.prefix != nil || TestPaths.isCI))
    func uninstall() async throws {
        let prefix = try #require(Installed.prefix, "DEBUSINE_VIRT_INSTALL_PREFIX is not set: run through scripts/test")
        let copy = try TestPaths.makeTemporaryDirectory("dv-prefix-copy.")
        defer { TestPaths.removeTree(copy) }
        try await runner.check(Command("cp", ["-a", "\(prefix)/.", copy]))
        let expected = [
            "bin/debusine-virt-qemu", "bin/debusine-virt-incus", "bin/debusine-virt-auxverb",
            "bin/autopkgtest-virt-debusine-virt-qemu", "bin/autopkgtest-virt-debusine-virt-incus",
            "share/man/man1/debusine-virt-qemu.1", "share/man/man1/debusine-virt-incus.1",
        ]
        for path in expected { #expect(FileManager.default.fileExists(atPath: "\(copy)/\(path)"), "\(path)") }
        #expect(
            try FileManager.default.destinationOfSymbolicLink(atPath: "\(copy)/bin/autopkgtest-virt-debusine-virt-qemu")
                == "debusine-virt-qemu")
        // The page itself (mdoc source), so the check needs no man-db on the machine.
        let page = try String(contentsOfFile: "\(copy)/share/man/man1/debusine-virt-incus.1", encoding: .utf8)
        #expect(
            page.contains(".Nm debusine-virt-incus") && page.contains("-remote"), "the man page documents the options")
        let removed = try await runner.run(
            Command("\(TestPaths.repositoryRoot)/scripts/install", ["--prefix", copy, "--uninstall"]))
        #expect(removed.status == .exited(0), "\(removed.errorText)")
        for path in expected { #expect(!FileManager.default.fileExists(atPath: "\(copy)/\(path)"), "\(path) is left") }
    }
}
