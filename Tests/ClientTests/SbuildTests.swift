import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// sbuild in autopkgtest mode over both installed servers, named as users name them
/// (`--autopkgtest-virt-server=debusine-virt-incus`), offline: it builds the examples/ fixture
/// package inside the testbed and brings the .deb back, moving every file through the auxverb.
@Suite("sbuild --chroot-mode=autopkgtest with both installed servers", .serialized)
struct SbuildTests {
    let runner = SubprocessRunner()

    /// A .dsc of the fixture in a fresh directory.
    func sourcePackage() async throws -> (work: String, dsc: String) {
        let work = try TestPaths.makeTemporaryDirectory("dv-sbuild.")
        try await runner.check(Command("cp", ["-r", "\(TestPaths.repositoryRoot)/examples/fixture", "\(work)/src"]))
        try await runner.check(Command("dpkg-source", ["--build", "src"], workingDirectory: work))
        return (work, "\(work)/debusine-virt-fixture_1.0.dsc")
    }

    /// Runs sbuild with `server` and its options, and checks the package it built.
    func build(server: String, options: [String]) async throws {
        let (work, dsc) = try await sourcePackage()
        defer { TestPaths.removeTree(work) }
        let arguments =
            [
                "--chroot-mode=autopkgtest", "--autopkgtest-virt-server=\(server)",
                // Offline: no archive to update from; the image has build-essential and fakeroot.
                "--no-apt-update", "--no-apt-upgrade", "--no-apt-distupgrade", "--arch-all", "--no-run-lintian",
                "--no-run-piuparts", "--no-run-autopkgtest", "--dist=bookworm", "--nolog",
            ] + options.map { "--autopkgtest-virt-server-opts=\($0)" } + [dsc]
        // sbuild looks the server up on its own $path setting, not the environment's, so a
        // prefix other than /usr/local goes there too (through a config file of the test's).
        let configuration = "\(work)/sbuild.conf"
        let path = try Installed.path()
        try "$path = '\(path)';\n1;\n".write(toFile: configuration, atomically: true, encoding: .utf8)
        let result = try await runner.run(
            Command(
                "sbuild", arguments, environment: ["PATH": path, "SBUILD_CONFIG": configuration],
                workingDirectory: work),
            input: .none, output: .capture(limit: 16 << 20),
            error: .capture(limit: 16 << 20))
        #expect(
            result.status == .exited(0),
            "sbuild: \(result.status)\n\(result.outputText.suffix(4000))\n\(result.errorText.suffix(2000))")
        let deb = "\(work)/debusine-virt-fixture_1.0_all.deb"
        let fields = try await runner.check(Command("dpkg-deb", ["--field", deb, "Package", "Version"]))
        #expect(fields == "Package: debusine-virt-fixture\nVersion: 1.0")
        let contents = try await runner.check(Command("dpkg-deb", ["--contents", deb]))
        #expect(contents.contains("./usr/share/doc/debusine-virt-fixture/README"))
        #expect(FileManager.default.fileExists(atPath: "\(work)/debusine-virt-fixture_1.0_amd64.changes"))
    }

    @Test(
        "sbuild --autopkgtest-virt-server=debusine-virt-incus builds the fixture package",
        .enabled(if: Installed.canRunIncus), .timeLimit(.minutes(10)))
    func incus() async throws {
        let image = try #require(Installed.incusImage, "DEBUSINE_VIRT_INCUS_IMAGE is not set: run through scripts/test")
        try await build(server: "debusine-virt-incus", options: [image])
    }

    @Test(
        "sbuild --autopkgtest-virt-server=debusine-virt-qemu builds the fixture package",
        .enabled(if: Installed.canRunQemu), .guestSlot(minutes: 15))
    func qemu() async throws {
        let images = try #require(
            Installed.qemuImages, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        try await build(
            server: "debusine-virt-qemu",
            // Each option its own --autopkgtest-virt-server-opts, as sbuild users give them
            // (issue 13: `--ram-size 3072` and IMAGE). A loaded 2-core CI machine can take minutes
            // to boot a TCG guest.
            options: [
                "--ram-size", "3072", "--accel", "tcg", "--network", "none", "--boot-timeout", "900",
                "\(images)/bookworm-amd64.qcow2",
            ])
    }
}
