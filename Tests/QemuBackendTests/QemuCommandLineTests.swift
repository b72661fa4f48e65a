import CommandRunner
import Foundation
import ImageCache
import Testing
import VirtCore
import VirtTestSupport

/// debusine-virt-qemu's command line as autopkgtest-virt-qemu's (autopkgtest 5.49): the built
/// executable is started over pipes and asked to quit after its banner, so nothing boots. With
/// `-d` it logs the QEMU command line and settings its options came to; those are checked.
@Suite("debusine-virt-qemu takes autopkgtest-virt-qemu's command line")
struct QemuCommandLineTests {
    let runner = SubprocessRunner()

    /// A private directory with small disk images that pass the image inspection: a raw boot
    /// disk with an EFI system partition, one with BIOS boot code and no ESP, and an empty qcow2
    /// for an extra disk.
    struct Scratch {
        let directory: String
        var image: String { "\(directory)/disk.img" }
        var biosImage: String { "\(directory)/bios.img" }
        var extra: String { "\(directory)/extra.qcow2" }

        init() async throws {
            directory = try TestPaths.makeTemporaryDirectory("dv-qemu-cli.")
            try await TestDisks.raw(image, size: 4 << 20, layout: .mbrWithESP)
            try await TestDisks.raw(biosImage, size: 4 << 20, layout: .mbrWithoutESP, bootCode: true)
            try await SubprocessRunner().check(Command("qemu-img", ["create", "-q", "-f", "qcow2", extra, "1M"]))
        }

        func remove() { TestPaths.removeTree(directory) }
    }

    /// Starts the server with `arguments`, expects the banner, quits, and returns its stderr.
    func accepted(_ arguments: [String], scratch: Scratch) async throws -> String {
        let server = try ServerProcess(
            [TestPaths.executable("debusine-virt-qemu")] + arguments, environment: ["TMPDIR": scratch.directory])
        let banner = try await server.readLine()
        #expect(banner == "ok", "\(arguments): \(server.standardError)")
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0), "\(arguments)")
        return await Self.finalStandardError(server)
    }

    /// stderr once the reader thread has caught up with a server that exited: it reads on after
    /// the exit, so what it has may still grow for a moment.
    static func finalStandardError(_ server: ServerProcess) async -> String {
        var last = server.standardError
        for _ in 0..<50 {
            try? await Task.sleep(for: .milliseconds(100))
            let now = server.standardError
            if now == last && !now.isEmpty { return now }
            last = now
        }
        return last
    }

    /// Starts the server with `arguments` and expects it to fail before the banner with
    /// `status`; returns its stderr.
    func refused(_ arguments: [String], status: Int32, scratch: Scratch) async throws -> String {
        let server = try ServerProcess(
            [TestPaths.executable("debusine-virt-qemu")] + arguments, environment: ["TMPDIR": scratch.directory])
        #expect(try await server.wait() == .exited(status), "\(arguments): \(server.standardError)")
        #expect(try await server.readLine() == nil, "nothing may reach stdout: \(arguments)")
        let standardError = await Self.finalStandardError(server)
        #expect(!standardError.contains("Unknown option"), "\(standardError)")
        return standardError
    }

    /// The QEMU command line a `-d` run logged, as words (the log quotes words with spaces).
    func qemuLine(_ standardError: String) -> String {
        for line in standardError.split(separator: "\n") {
            if let marker = line.range(of: "debug: QEMU: ") { return String(line[marker.upperBound...]) }
        }
        return ""
    }

    @Test("debusine's qemu executor's exact arguments (--boot efi --dpkg-architecture amd64 IMAGE) give a server")
    func debusineArguments() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let stderr = try await accepted(
            ["--boot", "efi", "--dpkg-architecture", "amd64", scratch.image], scratch: scratch)
        #expect(!stderr.contains("error"), "\(stderr)")
    }

    @Test("--dpkg-architecture i386 gives qemu-system-i386 with OVMF32, SMM, a secure flash and the 32-bit CPU model")
    func i386Defaults() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let qemu = qemuLine(
            try await accepted(
                ["-d", "--accel", "tcg", "--dpkg-architecture", "i386", scratch.image], scratch: scratch))
        #expect(qemu.hasPrefix("qemu-system-i386 "), "\(qemu)")
        for part in [
            "q35,accel=tcg,smm=on", "-cpu qemu32", "file=/usr/share/OVMF/OVMF32_CODE_4M.secboot.fd",
            "-global driver=cfi.pflash01,property=secure,value=on",
        ] {
            #expect(qemu.contains(part), "\(part) missing: \(qemu)")
        }
    }

    @Test(
        "--dpkg-architecture arm64 gives qemu-system-aarch64: the virt machine, AAVMF, autopkgtest's Cortex-A53 under TCG, no vmgenid; --boot bios is an x86 thing"
    )
    func arm64Defaults() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let stderr = try await accepted(
            ["-d", "--dpkg-architecture", "arm64", scratch.image], scratch: scratch)
        let qemu = qemuLine(stderr)
        #expect(qemu.hasPrefix("qemu-system-aarch64 "), "\(qemu)")
        for part in [
            "-machine virt,accel=tcg ", "-cpu cortex-a53", "file=/usr/share/AAVMF/AAVMF_CODE.fd",
            "-device virtio-serial-pci",
        ] {
            #expect(qemu.contains(part), "\(part) missing: \(qemu)")
        }
        for absent in ["vmgenid", "smm=on", "-nographic"] { #expect(!qemu.contains(absent), "\(absent): \(qemu)") }
        #expect(stderr.contains("guest architecture aarch64, host x86_64: using TCG"), "\(stderr)")
        // Its image decides nothing: no ESP is no boot, whatever boot code it has.
        let bios = try await refused(["--dpkg-architecture", "arm64", scratch.biosImage], status: 65, scratch: scratch)
        #expect(bios.contains("has no EFI system partition"), "\(bios)")
        let asked = try await refused(
            ["--dpkg-architecture", "arm64", "--boot", "bios", scratch.image], status: 69, scratch: scratch)
        #expect(asked.contains("--boot bios boots x86 guests (amd64, i386): arm64 guests boot EFI"), "\(asked)")
    }

    @Test(
        "every autopkgtest-virt-qemu option is accepted and reaches the VM: RAM, CPUs, QEMU, its options, disks, timeouts"
    )
    func everyOption() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let overlays = "\(scratch.directory)/overlays"
        try FileManager.default.createDirectory(atPath: overlays, withIntermediateDirectories: false)
        let stderr = try await accepted(
            [
                "--ram-size", "1024", "-c", "3", "--efi", "--boot", "auto", "--dpkg-architecture", "amd64",
                "--qemu-architecture", "x86_64", "-q", "qemu-system-x86_64", "--qemu-options",
                "-device  virtio-balloon\t-k en-us", "--qemu-option", "-no-reboot", "-o", overlays,
                "--timeout-reboot", "60", "--show-boot", "--timeout-poweroff", "5", "-d", "-u", "tester", "-p",
                "secret", "--baseimage", scratch.image, scratch.extra,
            ], scratch: scratch)
        let qemu = qemuLine(stderr)
        #expect(qemu.hasPrefix("qemu-system-x86_64 "), "\(stderr)")
        #expect(qemu.contains(" -smp 3 -m 1024 "))
        #expect(qemu.contains(" -drive file=\(scratch.extra),format=qcow2,if=virtio,readonly=on "))
        #expect(qemu.contains(" -device pcie-root-port,id=baseimage-port,chassis=1 "))
        #expect(qemu.hasSuffix(" -device virtio-balloon -k en-us -no-reboot"), "\(qemu)")
        #expect(stderr.contains("boot timeout 60 s; reboot timeout 60 s; shutdown timeout 5 s"), "\(stderr)")
        #expect(stderr.contains("overlay in \(overlays);"))
        #expect(stderr.contains("baseimage true; show boot true; console user tester; normal user tester"))
        #expect(!stderr.contains("secret"), "the password is never logged")
        #expect(TestPaths.contents(of: overlays).isEmpty, "nothing is made in --overlay-dir before open")
    }

    @Test("long options with =, joined short options, and the server's own names for the same settings")
    func spellings() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let joined = try await accepted(
            [
                "-d", "--ram-size=1536", "-c4", "--boot=efi", "--qemu-options=-snapshot", "-qqemu-system-x86_64",
                "-uroot", "-pxyz", "--shutdown-timeout", "7", scratch.image,
            ], scratch: scratch)
        #expect(qemuLine(joined).contains(" -smp 4 -m 1536 "), "\(joined)")
        #expect(qemuLine(joined).hasSuffix(" -snapshot"))
        #expect(joined.contains("shutdown timeout 7 s"))
        #expect(joined.contains("console user root; normal user found in the guest"), "root is no normal user")
        // --qemu (the old name of -q), --cpus, and --boot-timeout beside --timeout-reboot.
        let own = try await accepted(
            [
                "-d", "--qemu", "/usr/bin/qemu-system-x86_64", "--cpus", "1", "--boot-timeout", "900",
                "--timeout-reboot", "45", scratch.image,
            ], scratch: scratch)
        // Options after the image, as argparse also takes them.
        let after = try await accepted([scratch.image, "-d", "--ram-size", "768"], scratch: scratch)
        #expect(qemuLine(after).contains(" -m 768 "), "\(after)")
        #expect(qemuLine(own).hasPrefix("/usr/bin/qemu-system-x86_64 "), "\(own)")
        #expect(qemuLine(own).contains(" -smp 1 "))
        #expect(own.contains("boot timeout 900 s; reboot timeout 45 s"), "\(own)")
    }

    @Test("a repeated option keeps its last value, as argparse does; --boot bios then --efi boots EFI")
    func lastWins() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let stderr = try await accepted(
            [
                "-d", "--qemu-options", "-k fr", "--qemu-options", "-k de", "--timeout-poweroff", "3",
                "--shutdown-timeout", "4", "--boot", "bios", "--efi", scratch.image,
            ], scratch: scratch)
        #expect(qemuLine(stderr).hasSuffix(" -k de"), "\(stderr)")
        #expect(stderr.contains("shutdown timeout 4 s"))
    }

    @Test(
        "--boot bios boots QEMU's SeaBIOS (no flash, -nographic for its serial output); --boot auto decides from the image, and says so for BIOS"
    )
    func biosBoot() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        for arguments in [["--boot", "bios"], ["--boot", "auto"], []] {
            let stderr = try await accepted(["-d"] + arguments + [scratch.biosImage], scratch: scratch)
            let line = qemuLine(stderr)
            #expect(line.contains(" -nographic ") && !line.contains("pflash"), "\(arguments): \(line)")
            #expect(
                stderr.contains("booting it with BIOS (SeaBIOS)") == (arguments != ["--boot", "bios"]),
                "\(arguments): \(stderr)")
        }
        // An image with an EFI system partition boots EFI, unless BIOS is asked for.
        let efi = qemuLine(try await accepted(["-d", "--boot", "auto", scratch.image], scratch: scratch))
        #expect(efi.contains("if=pflash") && efi.contains(" -display none ") && !efi.contains("-nographic"), "\(efi)")
        // Asked for, a firmware the image has nothing for is refused before the banner, saying so.
        let noCode = try await refused(["--boot", "bios", scratch.image], status: 65, scratch: scratch)
        #expect(noCode.contains("has no BIOS boot code"), "\(noCode)")
        #expect(noCode.contains("it has an EFI system partition: --boot efi"), "\(noCode)")
        let noESP = try await refused(["--boot", "efi", scratch.biosImage], status: 65, scratch: scratch)
        #expect(noESP.contains("has no EFI system partition") && noESP.contains("--boot bios"), "\(noESP)")
        // EFI firmware given with auto asks for EFI; with bios it is a usage error.
        let given = try await refused(
            ["--efi-code", "/usr/share/OVMF/OVMF_CODE_4M.fd", scratch.biosImage], status: 65, scratch: scratch)
        #expect(given.contains("has no EFI system partition"), "\(given)")
        let mixed = try await refused(
            ["--boot", "bios", "--efi-vars", "/usr/share/OVMF/OVMF_VARS_4M.fd", scratch.biosImage], status: 64,
            scratch: scratch)
        #expect(mixed.contains("do not go with --boot bios"), "\(mixed)")
    }

    @Test(
        "what this server cannot serve yet is refused before the banner, naming the option and value",
        arguments: [
            (["--boot", "ieee1275"], "--boot ieee1275 is not supported yet"),
            (["--boot", "none"], "--boot none is not supported yet"),
            (["--efi", "--boot", "ieee1275"], "--boot ieee1275 is not supported yet"),
            (
                ["--dpkg-architecture", "armhf"],
                "--dpkg-architecture armhf (QEMU architecture arm) is not supported yet"
            ),
            (["--dpkg-architecture", "riscv64"], "--dpkg-architecture riscv64 is not supported yet"),
            (["--qemu-architecture", "ppc64le"], "--qemu-architecture ppc64le is not supported yet"),
            (["--qemu-architecture", "riscv64", "--dpkg-architecture", "amd64"], "--qemu-architecture riscv64 is not"),
        ])
    func notSupportedYet(_ arguments: [String], _ message: String) async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let stderr = try await refused(arguments + [scratch.image], status: 69, scratch: scratch)
        #expect(stderr.contains(message), "\(stderr)")
    }

    @Test(
        "wrong values of autopkgtest-virt-qemu's options are usage errors before the banner that say which",
        arguments: [
            (["--overlay-dir", "/nonexistent/dir"], 1, "--overlay-dir /nonexistent/dir is not a directory"),
            (["--timeout-reboot", "0"], 64, "--timeout-reboot must be positive"),
            (["--boot", "uefi"], 64, "'uefi' is invalid for '--boot"),
            (["-u", ""], 64, "--user must be a user name, without spaces or control characters"),
            (["--password", "a\nb"], 64, "--password must be one line"),
            (
                ["--statistics-file", "/nonexistent/statistics.json"], 69,
                "cannot write the statistics file /nonexistent/statistics.json: No such file or directory"
            ),
            (["--statistics-file", "/tmp/"], 64, "the statistics file /tmp/ names a directory"),
        ])
    func usageErrors(_ arguments: [String], _ status: Int32, _ message: String) async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let stderr = try await refused(arguments + [scratch.image], status: status, scratch: scratch)
        #expect(stderr.contains(message), "\(stderr)")
    }

    @Test("an extra image must be a readable local file: missing ones and URLs are refused before the banner")
    func extraImages() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        let missing = try await refused(
            [scratch.image, "\(scratch.directory)/absent.img"], status: 1, scratch: scratch)
        #expect(missing.contains("the image \(scratch.directory)/absent.img does not exist"), "\(missing)")
        let url = try await refused([scratch.image, "https://example.invalid/x.qcow2"], status: 64, scratch: scratch)
        #expect(url.contains("must be a local file"), "\(url)")
    }

    @Test(
        "a --user with a tab or a newline, or an empty one, is refused before the banner: it would be two capability words"
    )
    func userNames() async throws {
        let scratch = try await Scratch()
        defer { scratch.remove() }
        for user in ["x\tdowntmp-host=/tmp/p", "x\ny", "x y", ""] {
            let stderr = try await refused(["--user", user, scratch.image], status: 64, scratch: scratch)
            #expect(stderr.contains("--user must be a user name"), "\(stderr)")
        }
        let password = try await refused(
            ["--user", "u", "--password", "a\nb", scratch.image], status: 64, scratch: scratch)
        #expect(password.contains("--password must be one line"), "\(password)")
    }

    @Test(
        "serve is the default command: --help is its page, `serve IMAGE` starts it, `help` lists gc, gc has its own page"
    )
    func subcommands() async throws {
        let tool = TestPaths.executable("debusine-virt-qemu")
        let help = try await runner.run(Command(tool, ["--help"]))
        #expect(help.status == .exited(0) && help.outputText.contains("--ram-size"), "\(help.outputText)")
        #expect(try await runner.run(Command(tool, ["serve", "--help"])).outputText == help.outputText)
        let commands = try await runner.run(Command(tool, ["help"])).outputText
        #expect(commands.contains("serve (default)") && commands.contains("gc"), "\(commands)")
        let gc = try await runner.run(Command(tool, ["help", "gc"])).outputText
        #expect(gc.contains("USAGE: debusine-virt-qemu gc") && !gc.contains("--ram-size"), "\(gc)")
        let scratch = try await Scratch()
        defer { scratch.remove() }
        _ = try await accepted(["serve", "--network", "none", scratch.image], scratch: scratch)
    }

    @Test("check-states prints a line per saved state, removes a corrupt one, and then exits 1")
    func checkStates() async throws {
        let tool = TestPaths.executable("debusine-virt-qemu")
        let cache = try TestPaths.makeTemporaryDirectory("dv-check-states.")
        defer { TestPaths.removeTree(cache) }
        let empty = try await runner.run(Command(tool, ["check-states", "--cache-dir", cache]))
        #expect(empty.status == .exited(0) && empty.outputText.hasPrefix("no saved VM states in "), "\(empty)")
        let store = StateStore(cacheDirectory: cache)
        var paths: [String] = []
        for name in ["good", "bad"] {
            let builder = try #require(try store.beginSaving(StateStore.key(for: name)))
            try Data("memory".utf8).write(to: URL(fileURLWithPath: "\(builder.path)/vmstate"))
            try await builder.commit()
            paths.append("\(store.directory)/\(builder.key)")
        }
        try Data("MEMORY".utf8).write(to: URL(fileURLWithPath: "\(paths[1])/vmstate"))
        let checked = try await runner.run(Command(tool, ["check-states", "--cache-dir", cache]))
        #expect(checked.status == .exited(1), "\(checked)")
        let lines = Set(checked.outputText.split(separator: "\n").map(String.init))
        #expect(lines.contains("ok \(paths[0])"), "\(checked.outputText)")
        #expect(
            lines.contains { $0.hasPrefix("removed \(paths[1]): ") && $0.contains("corrupt") }, "\(checked.outputText)")
        #expect(!FileManager.default.fileExists(atPath: paths[1]))
        let again = try await runner.run(Command(tool, ["check-states", "--cache-dir", cache]))
        #expect(again.status == .exited(0) && again.outputText == "ok \(paths[0])", "\(again)")
    }

    @Test("every option of the installed autopkgtest-virt-qemu is one of ours")
    func referenceOptions() async throws {
        let reference = "/usr/bin/autopkgtest-virt-qemu"
        try #require(
            FileManager.default.fileExists(atPath: reference) || TestPaths.isCI == false,
            "autopkgtest is not installed")
        guard let source = try? String(contentsOfFile: reference, encoding: .utf8) else { return }
        let names = ReferenceOptions.names(inArgparseSource: source)
        #expect(names.count >= 20, "\(names)")
        let help = try await runner.run(Command(TestPaths.executable("debusine-virt-qemu"), ["--help"]))
        let ours = ReferenceOptions.names(inHelp: help.outputText + help.errorText)
        #expect(names.subtracting(ours).isEmpty, "missing: \(names.subtracting(ours).sorted())")
    }
}
