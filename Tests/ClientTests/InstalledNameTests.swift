import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// The README's install step puts everything in place, and uninstalling removes everything.
///
/// autopkgtest finding the servers by their bare names (through the autopkgtest-virt-* aliases)
/// is what the conformance matrix does in every form, and sbuild's tests by its own lookup;
/// a run of its own here repeated a matrix form (130 s of CI).
@Suite("The installed servers, by the names users type")
struct InstalledNameTests {
    let runner = SubprocessRunner()

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
