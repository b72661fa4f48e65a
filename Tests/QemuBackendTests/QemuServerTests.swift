import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// debusine-virt-qemu as autopkgtest runs it: the built executable over real pipes, booting the
/// project-built Debian image under TCG. One session covers open, the auxverb, copies, revert
/// and quit, and the --baseimage session the reboot, because every boot costs half a minute here
/// (about 45 CPU-seconds).
///
/// Needs DEBUSINE_VIRT_TEST_IMAGES (and DEBUSINE_VIRT_TEST_I386_IMAGES, DEBUSINE_VIRT_TEST_ARM64_IMAGES
/// for the i386 and arm64 guests; all set by scripts/test); in CI a missing image fails.
///
/// Not serialized: each test that runs a guest waits for a guest slot, and each has its own
/// TMPDIR. One after another, this suite was the longest chain of the test run's first phase.
@Suite("debusine-virt-qemu with a real VM")
struct QemuServerTests {
    static let imageDirectory = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_IMAGES"]
    static let enabled = imageDirectory != nil || TestPaths.isCI
    /// The i386 images (`scripts/build-test-images --arch i386`, DEBUSINE_VIRT_TEST_I386_IMAGES).
    static let i386ImageDirectory = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_I386_IMAGES"]
    /// The arm64 images (`scripts/build-test-images --arch arm64`, DEBUSINE_VIRT_TEST_ARM64_IMAGES).
    static let arm64ImageDirectory = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_ARM64_IMAGES"]

    let runner = SubprocessRunner()

    @Test(
        "a whole session: open, auxverb contract, 256 MiB streams, 1 GiB and 2000-file copies, revert, quit; nothing left behind",
        .enabled(if: enabled), .guestSlot(minutes: 30, ahead: true))
    func wholeSession() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let image = "\(directory)/bookworm-amd64.qcow2"
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let host = try TestPaths.makeTemporaryDirectory("dv-qemu-host.")
        defer { TestPaths.removeTree(host) }
        let server = try ServerProcess(
            [
                // The boot timeout leaves room for the start of a test run, when a dozen VMs boot at
                // once on two cores (300 s ran out once).
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--boot-timeout",
                "900", "--shutdown-timeout", "10", image,
            ],
            // The 1 GiB copy below takes minutes under TCG: more than the default 300 s allow.
            environment: ["TMPDIR": parent, "AUTOPKGTEST_VIRT_COPY_TIMEOUT": "1200"])
        #expect(try await server.readLine() == "ok")

        let capabilities = try await server.request("capabilities")
        for word in ["revert", "revert-full-system", "reboot", "root-on-testbed", "isolation-machine"] {
            #expect(capabilities.split(separator: " ").contains(Substring(word)), "\(capabilities)")
        }

        let opened = try await server.request("open", timeout: .seconds(960))
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        let scratch = String(opened.dropFirst(3))
        #expect(TestPaths.contents(of: parent).count == 1, "one private instance directory")

        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        func inGuest(_ argv: [String], input: CommandInput = .none) async throws -> CommandResult {
            try await runner.run(
                Command(argv: aux + argv), input: input, output: .capture(limit: 16 << 20), error: .capture)
        }

        // The scratch directory is world-writable: the testbed is a whole machine.
        #expect(try await inGuest(["stat", "-c", "%a", scratch]).outputText == "777")
        // Exit statuses and argv.
        #expect(try await inGuest(["sh", "-c", "exit 255"]).status == .exited(253))
        #expect(try await inGuest(["sh", "-c", "kill -9 $$"]).status == .exited(137))
        let words = ["a b", "", "ü€", "$(id)", "%2C,x"]
        #expect(try await inGuest(["printf", "[%s]"] + words).outputText == words.map { "[\($0)]" }.joined())
        #expect(try await inGuest(["id", "-u"]).outputText == "0")

        // 256 MiB through stdin and back through stdout, as sbuild moves files.
        let source = "\(host)/source"
        try await runner.check(Command("sh", ["-c", #"head -c 268435456 /dev/urandom > "$1""#, "sh", source]))
        let input = open(source, O_RDONLY)
        try #require(input >= 0)
        let up = try await inGuest(
            ["sh", "-c", "cat > /root/big"], input: .fileDescriptor(input, closeAfterStart: true))
        #expect(up.status == .exited(0), "\(up.errorText)")
        let back = "\(host)/back"
        let output = open(back, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(output >= 0)
        let down = try await runner.run(
            Command(argv: aux + ["cat", "/root/big"]), input: .none,
            output: .fileDescriptor(output, closeAfterStart: true), error: .capture)
        #expect(down.status == .exited(0))
        #expect(try await runner.run(Command("cmp", [source, back])).status == .exited(0))
        _ = try await inGuest(["rm", "-f", "/root/big"])
        unlink(source)
        unlink(back)

        // Four auxverbs at once.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<4 {
                group.addTask {
                    let result = try await inGuest(["sh", "-c", #"sleep 2; echo "$1""#, "sh", "\(index)"])
                    #expect(result.outputText == "\(index)")
                }
            }
            try await group.waitForAll()
        }

        // copydown/copyup of a file (execute bit kept) and a tree with odd names.
        try await runner.check(
            Command(
                "sh",
                [
                    "-c",
                    #"mkdir -p "$1/tree/sub ü" && for i in $(seq 1 2000); do echo "$i" > "$1/tree/sub ü/f $i"; done && printf '#!/bin/sh\n' > "$1/tool" && chmod 755 "$1/tool""#,
                    "sh", host,
                ]))
        let encodedHost = host.replacingOccurrences(of: " ", with: "%20")
        #expect(try await server.request("copydown \(encodedHost)/tool \(scratch)/tool") == "ok")
        #expect(try await inGuest(["test", "-x", "\(scratch)/tool"]).status == .exited(0))
        #expect(try await server.request("copydown \(encodedHost)/tree/ \(scratch)/tree/") == "ok")
        #expect(try await server.request("copyup \(scratch)/tree/ \(encodedHost)/tree-back/") == "ok")
        #expect(
            try await runner.run(Command("diff", ["-r", "\(host)/tree", "\(host)/tree-back"])).status == .exited(0))
        #expect(try await server.request("copyup /nonexistent \(encodedHost)/x") == "copy-failed")

        // A 1 GiB file of random data down and back up, byte for byte.
        try await runner.check(Command("sh", ["-c", #"head -c 1073741824 /dev/urandom > "$1/huge""#, "sh", host]))
        #expect(
            try await server.request("copydown \(encodedHost)/huge \(scratch)/huge", timeout: .seconds(1200)) == "ok")
        #expect(
            try await server.request("copyup \(scratch)/huge \(encodedHost)/huge-back", timeout: .seconds(1200)) == "ok"
        )
        #expect(try await runner.run(Command("cmp", ["\(host)/huge", "\(host)/huge-back"])).status == .exited(0))
        _ = try await inGuest(["rm", "-f", "\(scratch)/huge"])
        unlink("\(host)/huge")
        unlink("\(host)/huge-back")

        // (The reboot, a cold boot under TCG, is the --baseimage session's below.)
        // revert: same scratch path, a clean machine, the same capabilities as after open.
        let openedCapabilities = try await server.request("capabilities")
        #expect(try await server.request("revert") == "ok \(scratch)")
        #expect(try await server.request("capabilities") == openedCapabilities)
        #expect(try await inGuest(["test", "-e", "/root/big"]).status == .exited(1))
        #expect(try await inGuest(["test", "-d", scratch]).status == .exited(0))

        // A guest that refuses to power off is stopped after --shutdown-timeout all the same.
        #expect(try await inGuest(["systemctl", "mask", "--runtime", "poweroff.target"]).status == .exited(0))
        let clock = ContinuousClock()
        let quitting = clock.now
        server.write(line: "quit")
        #expect(try await server.wait(timeout: .seconds(180)) == .exited(0), "\(server.standardError)")
        #expect(clock.now - quitting < .seconds(60))
        #expect(server.standardError.contains("did not shut down within 10 s"), "\(server.standardError)")
        #expect(try await server.readLine() == nil)
        #expect(TestPaths.contents(of: parent) == [], "the instance directory was left behind")
        let leftover = try await runner.run(Command("pgrep", ["-f", parent]))
        #expect(leftover.outputText.isEmpty, "QEMU processes left behind: \(leftover.outputText)")
    }

    @Test(
        "--user NAME is advertised as suggested-normal-user once open and after each revert, and not before open",
        .enabled(if: enabled), .guestSlot(minutes: 8))
    func suggestedNormalUser() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--user", "tester",
                "--boot-timeout", "900", "\(directory)/bookworm-amd64.qcow2",
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok", "\(server.standardError)")
        #expect(!(try await server.request("capabilities")).contains("suggested-normal-user"))
        let opened = try await server.request("open", timeout: .seconds(960))
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        for step in ["open", "revert"] {
            if step == "revert" {
                #expect(try await server.request("revert", timeout: .seconds(960)) == opened, "\(server.standardError)")
            }
            let words = try await server.request("capabilities").split(separator: " ")
            #expect(words.contains("suggested-normal-user=tester"), "after \(step): \(words)")
        }
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0), "\(server.standardError)")
        #expect(TestPaths.contents(of: parent).isEmpty, "the instance directory was left behind")
    }

    @Test(
        "debusine's executor's command line (--boot efi --dpkg-architecture amd64 IMAGE), with --network none, opens and runs a command",
        .enabled(if: enabled), .guestSlot(minutes: 20))
    func debusineCommandLine() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--boot", "efi", "--dpkg-architecture", "amd64",
                "--network",
                "none", "\(directory)/bookworm-amd64.qcow2",
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok", "\(server.standardError)")
        let opened = try await server.request("open", timeout: .seconds(960))
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        let result = try await runner.run(Command(argv: aux + ["dpkg", "--print-architecture"]))
        #expect(result.status == .exited(0) && result.outputText == "amd64", "\(result.errorText)")
        // An argv of 1.5 MiB: more than one frame's payload, within Linux's limit, in the guest too.
        let words = (0..<12).map { String(repeating: String(UnicodeScalar(UInt8(97 + $0))), count: 130_000) }
        let large = try await runner.run(Command(argv: aux + ["sh", "-c", #"echo $# ${#12}"#, "sh"] + words))
        #expect(large.status == .exited(0) && large.outputText == "12 130000", "\(large.status) \(large.errorText)")
        #expect(try await server.request("close") == "ok")
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0))
        #expect(TestPaths.contents(of: parent).isEmpty, "the instance directory was left behind")
    }

    @Test(
        "--baseimage: /dev/baseimage reads as the base image, after a reboot (a new boot id, the scratch directory kept) and a revert too; an extra image is vdb, read-only; --overlay-dir keeps the overlay private and loses it at close; --show-boot shows the reboot",
        .enabled(if: enabled), .guestSlot(minutes: 30))
    func baseImageExtraDisksOverlayDirectory() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let image = "\(directory)/bookworm-amd64.qcow2"
        // Any stable file will do as the extra disk: the tarball's bytes, seen raw. Stable, so the
        // saved state of this command line is reused by later runs.
        let extra = "\(directory)/bookworm-amd64.tar.xz"
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let overlays = try TestPaths.makeTemporaryDirectory("dv-qemu-overlays.")
        defer { TestPaths.removeTree(overlays) }
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--boot-timeout",
                "900", "--timeout-reboot", "900", "--shutdown-timeout", "10", "--baseimage", "-o", overlays,
                "--show-boot", image, extra,
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok")
        let opened = try await server.request("open", timeout: .seconds(960))
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        func inGuest(_ argv: [String]) async throws -> CommandResult {
            try await runner.run(Command(argv: aux + argv), input: .none, output: .capture, error: .capture)
        }

        // The overlay: in a private directory of its own in --overlay-dir, named for gc.
        let made = TestPaths.contents(of: overlays)
        try #require(made.count == 1 && made[0].hasPrefix("dvq-overlay."), "\(made)")
        var info = stat()
        #expect(stat("\(overlays)/\(made[0])", &info) == 0 && info.st_mode & 0o777 == 0o700)
        #expect(TestPaths.contents(of: "\(overlays)/\(made[0])") == ["overlay.qcow2"])
        let instances = TestPaths.contents(of: parent)
        try #require(instances.count == 1)
        let record = try String(contentsOfFile: "\(parent)/\(instances[0])/overlay-dir", encoding: .utf8)
        #expect(record == "\(overlays)/\(made[0])\n")

        // /dev/baseimage: the image as the guest reads it, compared with the host's reading.
        let host = "\(parent)/first-mib"
        try await runner.check(
            Command("qemu-img", ["dd", "-f", "qcow2", "-O", "raw", "bs=1M", "count=1", "if=\(image)", "of=\(host)"]))
        let expected = try await runner.check(Command("sha256sum", [host])).prefix(64)
        func checkBaseImage(_ when: String) async throws {
            let read = try await inGuest(["sh", "-c", "head -c 1048576 /dev/baseimage | sha256sum"])
            #expect(read.status == .exited(0), "\(when): \(read.errorText)")
            #expect(read.outputText.prefix(64) == expected, "\(when)")
            let writable = try await inGuest([
                "sh", "-c", "cat /sys/block/$(basename $(readlink -f /dev/baseimage))/ro",
            ])
            #expect(writable.outputText == "1", "\(when): the base image must be read-only")
        }
        try await checkBaseImage("after open")

        // The extra image: the next disk after the boot disk, read-only, with the file's bytes.
        let magic = try await inGuest(["sh", "-c", "head -c 6 /dev/vdb | od -An -tx1"])
        #expect(magic.outputText.split(separator: " ") == ["fd", "37", "7a", "58", "5a", "00"], "\(magic.outputText)")
        #expect(try await inGuest(["cat", "/sys/block/vdb/ro"]).outputText == "1")

        // reboot: a new boot, the scratch directory and what the test put there still there.
        let scratch = String(opened.dropFirst(3))
        #expect(
            try await inGuest(["sh", "-c", #"printf '#!/bin/sh\n' > "$1/tool" && chmod 755 "$1/tool""#, "sh", scratch])
                .status == .exited(0))
        let bootBefore = try await inGuest(["cat", "/proc/sys/kernel/random/boot_id"]).outputText
        let before = server.standardError.count
        #expect(try await server.request("reboot", timeout: .seconds(960)) == "ok", "\(server.standardError)")
        let bootAfter = try await inGuest(["cat", "/proc/sys/kernel/random/boot_id"]).outputText
        #expect(!bootAfter.isEmpty && bootAfter != bootBefore, "the boot id is \(bootAfter), was \(bootBefore)")
        #expect(try await inGuest(["test", "-x", "\(scratch)/tool"]).status == .exited(0))
        try await checkBaseImage("after reboot")
        // The boot loader's banner, not the login prompt (the agent can answer, and the echo
        // stop, before getty writes its prompt) nor the kernel's (the test images boot quiet).
        #expect(
            server.standardError.dropFirst(before).contains("Welcome to GRUB!"),
            "--show-boot did not show the reboot's console")

        // A revert after the reboot: the saved machine again, what the test put there gone.
        #expect(try await server.request("revert", timeout: .seconds(960)) == "ok \(scratch)")
        #expect(try await inGuest(["test", "-e", "\(scratch)/tool"]).status == .exited(1))
        try await checkBaseImage("after revert")

        #expect(try await server.request("close") == "ok")
        #expect(TestPaths.contents(of: overlays).isEmpty, "the overlay's directory was left behind")
        server.write(line: "quit")
        #expect(try await server.wait(timeout: .seconds(180)) == .exited(0), "\(server.standardError)")
        #expect(TestPaths.contents(of: parent).filter { $0.hasPrefix("dvq.") }.isEmpty)
    }

    @Test(
        "--statistics-file: whole JSON after every verb; a process holding 300 MiB and a 200 MiB file show in the peaks, the overlay's growth too",
        .enabled(if: enabled), .guestSlot(minutes: 20))
    func statisticsFile() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        let output = try TestPaths.makeTemporaryDirectory("dv-statistics.")
        defer {
            TestPaths.removeTree(parent)
            TestPaths.removeTree(output)
        }
        let image = "\(directory)/bookworm-amd64.qcow2"
        let path = "\(output)/statistics.json"
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--boot-timeout",
                "900", "--statistics-file", path, image,
            ],
            environment: ["TMPDIR": parent])
        try await StatisticsSession.run(server, path: path, backend: "qemu", image: image, privateDisk: true)
        let closed = try StatisticsSession.read(path)
        #expect((closed["host_disk_space"] as? NSNumber)?.intValue ?? 0 >= 195 << 20, "\(closed)")
        #expect((closed["cpu_count"] as? NSNumber)?.intValue == 2, "the default -smp: \(closed)")
        #expect(TestPaths.contents(of: parent).isEmpty, "the instance directory was left behind")
    }

    // The amd64 fixture run is scripts/main-job's, which CI runs before this suite and which checks
    // the same things (with the release build and --accel auto); a run here repeated it (about
    // 110 s of a guest slot in CI).

    @Test(
        "autopkgtest runs the fixture package in an i386 guest (--dpkg-architecture i386: qemu-system-i386, OVMF32)",
        .enabled(if: i386ImageDirectory != nil || TestPaths.isCI), .guestSlot(minutes: 25, ahead: true))
    func autopkgtestFixtureI386() async throws {
        let directory = try #require(
            Self.i386ImageDirectory, "DEBUSINE_VIRT_TEST_I386_IMAGES is not set: run through scripts/test")
        try await fixtureRun(image: "\(directory)/bookworm-i386.qcow2", architecture: "i386")
    }

    @Test(
        "autopkgtest runs the fixture package in an arm64 guest (--dpkg-architecture arm64: qemu-system-aarch64 -machine virt, AAVMF, Cortex-A53 under TCG)",
        .enabled(if: arm64ImageDirectory != nil || TestPaths.isCI), .guestSlot(minutes: 25, ahead: true))
    func autopkgtestFixtureArm64() async throws {
        let directory = try #require(
            Self.arm64ImageDirectory, "DEBUSINE_VIRT_TEST_ARM64_IMAGES is not set: run through scripts/test")
        try await fixtureRun(image: "\(directory)/bookworm-arm64.qcow2", architecture: "arm64")
    }

    @Test(
        "autopkgtest runs the fixture package in an amd64 guest booted by SeaBIOS (--boot bios), which has no EFI",
        .enabled(if: enabled), .guestSlot(minutes: 25))
    func autopkgtestFixtureBIOS() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        // The setup command fails the run (a testbed failure) in a guest that booted EFI; it runs
        // again after each revert and reboot, restored guests included.
        try await fixtureRun(
            image: "\(directory)/bookworm-amd64.qcow2", architecture: "amd64", serverOptions: ["--boot", "bios"],
            setupCommands: "test ! -d /sys/firmware/efi")
    }

    /// The fixture under autopkgtest on `image`, a guest of dpkg architecture `architecture`,
    /// with `serverOptions` for the server and autopkgtest's `--setup-commands` if given.
    func fixtureRun(
        image: String, architecture: String, serverOptions: [String] = [], setupCommands: String? = nil
    ) async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-autopkgtest.")
        defer { TestPaths.removeTree(work) }
        let result = try await FixturePackage.run(
            server: [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none",
                "--dpkg-architecture", architecture, "--boot-timeout", "900",
            ] + serverOptions + [image],
            options: setupCommands.map { ["--setup-commands", $0] } ?? [], environment: ["TMPDIR": work], work: work)
        let log = (try? String(contentsOfFile: "\(work)/out/log", encoding: .utf8)) ?? ""
        #expect(log.contains("testbed dpkg architecture: \(architecture)\n"), "\(log.suffix(4000))")
        // The revert after breaks-testbed restored the saved state, so the reboot test after it
        // rebooted a restored guest (SavedStateTests leaves that to this run).
        // (The open may have restored it too: what counts is a restore after breaks-testbed.)
        let afterBreakage = result.errorText.components(separatedBy: "test breaks-testbed: ").dropFirst().joined()
        #expect(
            afterBreakage.contains("restored the saved VM state"),
            "no restore after breaks-testbed on the server's stderr:\n\(result.errorText.suffix(4000))")
        #expect(
            TestPaths.contents(of: work).filter { $0.hasPrefix("dvq.") }.isEmpty,
            "an instance directory was left behind")
    }

    @Test(
        "after the server is killed with SIGKILL, its death watch kills its QEMU and removes its instance directory",
        .enabled(if: enabled), .guestSlot(minutes: 10))
    func deathWatchAfterKill() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-gc.")
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--boot-timeout",
                "900", "\(directory)/bookworm-amd64.qcow2",
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok")
        #expect(try await server.request("open", timeout: .seconds(960)).hasPrefix("ok /"))
        #expect(try await runner.run(Command("pgrep", ["-f", parent])).status == .exited(0), "no QEMU runs")
        server.signal(SIGKILL)
        #expect(try await server.wait() == .signaled(SIGKILL))
        let deadline = ContinuousClock.now + .seconds(120)
        func qemuRuns() async throws -> Bool {
            try await runner.run(Command("pgrep", ["-f", parent])).status == .exited(0)
        }
        while ContinuousClock.now < deadline, try await qemuRuns() || !TestPaths.contents(of: parent).isEmpty {
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect(try await !qemuRuns(), "QEMU outlived its server")
        #expect(TestPaths.contents(of: parent) == [], "the instance directory outlived its server")
        let said = await server.standardError(containing: "died without cleaning up")
        #expect(said.contains("killed its QEMU"), "the watch did not say what it did: \(said)")
        let gc = try await runner.run(
            Command(TestPaths.executable("debusine-virt-qemu"), ["gc"], environment: ["TMPDIR": parent]))
        #expect(gc.outputText == "nothing to remove in \(parent)")
    }

    @Test("gc removes the instance directory of a dead server and kills what runs in it; a live server's stays")
    func gcCollects() async throws {
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-gc.")
        defer { TestPaths.removeTree(parent) }
        // A loop whose command line names the directory stands in for its QEMU; the live owner's
        // names debusine-virt-qemu, as a server's does.
        func loop(_ name: String) throws -> ServerProcess {
            try ServerProcess(["/bin/sh", "-c", "while :; do sleep 1; done", name])
        }
        let exited = try ServerProcess(["/bin/true"])
        #expect(try await exited.wait() == .exited(0))
        let liveOwner = try loop("debusine-virt-qemu")
        defer { liveOwner.signal(SIGKILL) }
        var qemus: [ServerProcess] = []
        defer { for qemu in qemus { qemu.signal(SIGKILL) } }
        for (name, owner) in [("dvq.dead", exited.pid), ("dvq.live", liveOwner.pid)] {
            let instance = "\(parent)/\(name)"
            #expect(mkdir(instance, 0o700) == 0)
            let qemu = try loop(instance)
            qemus.append(qemu)
            try Data("\(owner)\n".utf8).write(to: URL(fileURLWithPath: "\(instance)/owner"))
            try Data("\(qemu.pid)\n".utf8).write(to: URL(fileURLWithPath: "\(instance)/qemu.pid"))
        }
        let gc = Command(TestPaths.executable("debusine-virt-qemu"), ["gc"], environment: ["TMPDIR": parent])
        let first = try await runner.run(gc)
        #expect(first.status == .exited(0))
        #expect(
            first.outputText == "removed \(parent)/dvq.dead and killed its QEMU (pid \(qemus[0].pid))",
            "\(first.outputText)")
        #expect(TestPaths.contents(of: parent) == ["dvq.live"])
        #expect(try await qemus[0].wait(timeout: .seconds(10)) == .signaled(SIGKILL))
        let second = try await runner.run(gc)
        #expect(second.outputText == "nothing to remove in \(parent)")
    }

    @Test(
        "an image with no partition table is refused before the banner with exit 65, a clear message, nothing left",
        .enabled(if: enabled), .timeLimit(.minutes(5)))
    func unbootableImage() async throws {
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let bogus = "\(parent)/not-an-image.raw"
        try Data(repeating: 0, count: 1 << 20).write(to: URL(fileURLWithPath: bogus))
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--boot-timeout",
                "20", bogus,
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.wait(timeout: .seconds(120)) == .exited(65))
        #expect(try await server.readLine() == nil, "no banner")
        #expect(server.standardError.contains("has no partition table"), "\(server.standardError)")
        #expect(TestPaths.contents(of: parent) == ["not-an-image.raw"], "something was left behind")
    }

    /// Boots a disk that passes the inspection (a GPT with an EFI system partition holding an
    /// empty FAT) but has no boot loader, and returns how long `open` took to fail and the
    /// server's stderr, having checked the failure and that nothing was left behind.
    func bootWithoutLoader(_ extra: [String]) async throws -> (Duration, String) {
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let image = "\(parent)/esp-without-loader.raw"
        try await TestDisks.raw(image, layout: .gptWithESP, fatOnESP: true)
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--no-snapshot",
                "--shutdown-timeout", "5",
            ] + extra + [image],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok", "\(server.standardError)")
        let clock = ContinuousClock()
        let start = clock.now
        server.write(line: "open")
        #expect(try await server.wait(timeout: .seconds(400)) == .exited(12))
        let took = clock.now - start
        #expect(try await server.readLine() == nil, "open must not answer")
        #expect(server.standardError.contains("the firmware found nothing to boot on the image \(image)"))
        #expect(server.standardError.contains("failed to load Boot0001"), "\(server.standardError)")
        #expect(TestPaths.contents(of: parent) == ["esp-without-loader.raw"], "the instance directory was left behind")
        let leftover = try await runner.run(Command("pgrep", ["-f", parent]))
        #expect(leftover.outputText.isEmpty, "QEMU processes left behind: \(leftover.outputText)")
        return (took, server.standardError)
    }

    @Test(
        "a disk with nothing to boot ends open as soon as the firmware falls back to its shell, quoting it",
        .enabled(if: enabled), .guestSlot(minutes: 8))
    func firmwareShell() async throws {
        let (took, stderr) = try await bootWithoutLoader([])
        #expect(stderr.contains("and fell back to its UEFI shell"), "\(stderr)")
        // About 10 s here on an idle machine (firmware start, then the 3 s agent polls); the
        // boot timeout is 300 s.
        #expect(took < .seconds(120), "took \(took)")
    }

    @Test(
        "with a network card, a disk with nothing to boot ends open when the firmware turns to the network",
        .enabled(if: enabled), .guestSlot(minutes: 8))
    func firmwareNetworkBoot() async throws {
        // A card with no network behind it (no -netdev): what the firmware sends goes nowhere.
        let (took, stderr) = try await bootWithoutLoader([
            "--qemu-option", "-device", "--qemu-option", "virtio-net-pci",
        ])
        #expect(stderr.contains("and tried to boot from the network"), "\(stderr)")
        #expect(took < .seconds(120), "took \(took)")
    }

    @Test(
        "an image whose guest agent never starts fails soon after its login prompt, naming qemu-guest-agent",
        .enabled(if: enabled), .guestSlot(minutes: 8))
    func noGuestAgent() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--qemu",
                "\(TestPaths.repositoryRoot)/Tests/QemuBackendTests/Fixtures/qemu-without-agent",
                "--shutdown-timeout", "5", "\(directory)/bookworm-amd64.qcow2",
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok")
        let clock = ContinuousClock()
        let start = clock.now
        server.write(line: "open")
        #expect(try await server.wait(timeout: .seconds(420)) == .exited(12))
        // Well before the 300 s boot timeout.
        #expect(clock.now - start < .seconds(240), "took \(clock.now - start)")
        #expect(server.standardError.contains("needs qemu-guest-agent installed"), "\(server.standardError)")
        #expect(server.standardError.contains("login:"), "the console's end is shown")
        #expect(TestPaths.contents(of: parent).isEmpty, "the instance directory was left behind")
        let leftover = try await runner.run(Command("pgrep", ["-f", parent]))
        #expect(leftover.outputText.isEmpty, "QEMU processes left behind: \(leftover.outputText)")
    }

    @Test(
        "shell gives an interactive root shell on a pseudo-terminal in the guest, on the caller's terminal",
        .enabled(if: enabled), .guestSlot(minutes: 8))
    func shell() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess(
            [
                "\(TestPaths.repositoryRoot)/Tests/Fixtures/with-terminal", "-42 0 /dev/pts/",
                "echo in-$(basename \"$PWD\")-$((6*7)) $(id -u) $(tty); exit\r",
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--boot-timeout",
                "900", "--shutdown-timeout", "10", "\(directory)/bookworm-amd64.qcow2",
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok")
        let opened = try await server.request("open", timeout: .seconds(960))
        try #require(opened.hasPrefix("ok /"), "\(server.standardError)")
        let scratch = String(opened.dropFirst(3))
        #expect(try await server.request("shell \(scratch)") == "ok", "\(server.standardError)")
        #expect(try await server.request("close") == "ok")
        server.write(line: "quit")
        #expect(
            try await server.wait() == .exited(0),
            "the terminal did not show the shell's answer: \(server.standardError)")
        let name = scratch.split(separator: "/").last.map(String.init) ?? scratch
        #expect(server.standardError.contains("in-\(name)-42 0 /dev/pts/"), "\(server.standardError)")
        #expect(TestPaths.contents(of: parent).isEmpty, "the instance directory was left behind")
    }
}
