import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// sbuild in autopkgtest mode over both installed servers, named as users name them
/// (`--autopkgtest-virt-server=debusine-virt-incus`), offline: it builds an examples/ package
/// inside the testbed and brings the .deb back, moving every file through the auxverb. On an
/// arm64 guest it builds a C program (examples/hello) with `--arch=arm64`, which sbuild refuses
/// unless the testbed's dpkg says arm64.
@Suite("sbuild --chroot-mode=autopkgtest with both installed servers", .serialized)
struct SbuildTests {
    let runner = SubprocessRunner()

    /// A source package of examples/`name` (dpkg-source's `.dsc` made in a fresh directory).
    struct Package {
        var name: String
        var source: String
        var version = "1.0"
    }

    static let fixture = Package(name: "fixture", source: "debusine-virt-fixture")
    static let hello = Package(name: "hello", source: "debusine-virt-hello")

    /// A .dsc of `package` in a fresh directory.
    func sourcePackage(_ package: Package) async throws -> (work: String, dsc: String) {
        let work = try TestPaths.makeTemporaryDirectory("dv-sbuild.")
        try await runner.check(
            Command("cp", ["-r", "\(TestPaths.repositoryRoot)/examples/\(package.name)", "\(work)/src"]))
        try await runner.check(Command("dpkg-source", ["--build", "src"], workingDirectory: work))
        return (work, "\(work)/\(package.source)_\(package.version).dsc")
    }

    /// Runs sbuild with `server` and its options on `package` for `architecture` (sbuild's
    /// `--arch`, the testbed's), checks the .changes, then `check` with the work directory and
    /// sbuild's output (its build log, with `--nolog`).
    func build(
        _ package: Package = fixture, architecture: String = "amd64", server: String, options: [String],
        check: (_ work: String, _ log: String) async throws -> Void
    ) async throws {
        let (work, dsc) = try await sourcePackage(package)
        defer { TestPaths.removeTree(work) }
        let arguments =
            [
                "--chroot-mode=autopkgtest", "--autopkgtest-virt-server=\(server)", "--arch=\(architecture)",
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
        let changes = "\(work)/\(package.source)_\(package.version)_\(architecture).changes"
        #expect(FileManager.default.fileExists(atPath: changes), "no \(changes)")
        try await check(work, result.outputText)
    }

    /// Checks the fixture's .deb that sbuild brought back into `work`.
    func checkFixture(in work: String) async throws {
        let deb = "\(work)/debusine-virt-fixture_1.0_all.deb"
        let fields = try await runner.check(Command("dpkg-deb", ["--field", deb, "Package", "Version"]))
        #expect(fields == "Package: debusine-virt-fixture\nVersion: 1.0")
        let contents = try await runner.check(Command("dpkg-deb", ["--contents", deb]))
        #expect(contents.contains("./usr/share/doc/debusine-virt-fixture/README"))
    }

    @Test(
        "sbuild --autopkgtest-virt-server=debusine-virt-incus builds the fixture package",
        .enabled(if: Installed.canRunIncus), .timeLimit(.minutes(10)))
    func incus() async throws {
        let image = try #require(Installed.incusImage, "DEBUSINE_VIRT_INCUS_IMAGE is not set: run through scripts/test")
        try await build(server: "debusine-virt-incus", options: [image]) { work, _ in try await checkFixture(in: work) }
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
            ]
        ) { work, _ in try await checkFixture(in: work) }
    }

    @Test(
        "sbuild --arch=arm64 with debusine-virt-qemu --dpkg-architecture arm64 builds a C program for aarch64",
        .enabled(if: Installed.canRunQemuArm64), .guestSlot(minutes: 20))
    func qemuArm64() async throws {
        let images = try #require(
            Installed.qemuArm64Images, "DEBUSINE_VIRT_TEST_ARM64_IMAGES is not set: run through scripts/test")
        try await build(
            Self.hello, architecture: "arm64", server: "debusine-virt-qemu",
            options: [
                "--dpkg-architecture", "arm64", "--accel", "tcg", "--network", "none", "--boot-timeout", "900",
                "\(images)/bookworm-arm64.qcow2",
            ]
        ) { work, log in try await checkHello(in: work, log: log) }
    }

    /// Checks the aarch64 build of examples/hello that sbuild brought back into `work`.
    func checkHello(in work: String, log: String) async throws {
        // debian/rules runs what it compiled: it ran on the guest's CPU.
        #expect(log.contains("hello from aarch64"), "\(log.suffix(4000))")
        let deb = "\(work)/debusine-virt-hello_1.0_arm64.deb"
        let fields = try await runner.check(Command("dpkg-deb", ["--field", deb, "Package", "Architecture"]))
        #expect(fields == "Package: debusine-virt-hello\nArchitecture: arm64")
        let unpacked = "\(work)/unpacked"
        try await runner.check(Command("dpkg-deb", ["-x", deb, unpacked]))
        // ELF's e_machine (bytes 18-19, little-endian): 183 is EM_AARCH64.
        let program = try #require(FileManager.default.contents(atPath: "\(unpacked)/usr/bin/debusine-virt-hello"))
        #expect(program.count > 20 && program.prefix(4) == Data([0x7F, 0x45, 0x4C, 0x46]), "not an ELF file")
        #expect(program.count > 20 && Int(program[18]) | Int(program[19]) << 8 == 183, "not an aarch64 program")
    }
}
