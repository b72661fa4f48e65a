import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import QemuBackend

/// debusine-virt-qemu on an image without qemu-guest-agent (the agent-less variant that
/// scripts/build-test-images makes, like Debian's nocloud images): the server logs in as root
/// on the serial console and installs the agent with apt-get.
///
/// The guest's only network is QEMU user networking with `restrict=on`, whose one way out is a
/// guestfwd of the image's apt source (10.0.2.100:80), through Fixtures/loopback-relay, to a
/// server of the build's agent repository on the host's loopback: no traffic leaves the host.
///
/// The install runs on the agent-less image of each architecture the tests boot: the console is
/// an 8250 UART (ttyS0) on amd64 and i386, a PL011 (ttyAMA0) on arm64, and apt installs the
/// guest's own architecture's packages.
///
/// Needs DEBUSINE_VIRT_TEST_IMAGES, DEBUSINE_VIRT_TEST_I386_IMAGES and
/// DEBUSINE_VIRT_TEST_ARM64_IMAGES (set by scripts/test); an architecture whose images are not
/// set is left out, except in CI, where a missing image fails.
@Suite("debusine-virt-qemu installs qemu-guest-agent over the serial console")
struct AgentInstallTests {
    static let imageDirectory = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_IMAGES"]
    static let enabled = imageDirectory != nil || TestPaths.isCI

    /// A guest architecture with an agent-less test image.
    enum Guest: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case amd64, i386, arm64

        /// The variable scripts/test sets to the directory of this architecture's images.
        var variable: String {
            switch self {
            case .amd64: "DEBUSINE_VIRT_TEST_IMAGES"
            case .i386: "DEBUSINE_VIRT_TEST_I386_IMAGES"
            case .arm64: "DEBUSINE_VIRT_TEST_ARM64_IMAGES"
            }
        }
        var imageDirectory: String? { ProcessInfo.processInfo.environment[variable] }
        /// The serial console the server logs in on (the kernel's console= of the image).
        var console: String { self == .arm64 ? "ttyAMA0" : "ttyS0" }
        var testDescription: String { rawValue }

        /// Those whose images are there; in CI all of them, so that a missing one fails.
        static var testable: [Guest] { allCases.filter { $0.imageDirectory != nil || TestPaths.isCI } }
    }

    let runner = SubprocessRunner()

    @Test(
        "an image without the agent gets it installed over the serial console from an apt repository on loopback; then commands run",
        .enabled(if: enabled), .guestSlot(minutes: 25), arguments: Guest.testable)
    func installsTheAgent(_ guest: Guest) async throws {
        let directory = try #require(guest.imageDirectory, "\(guest.variable) is not set: run through scripts/test")
        let http = try await TestHTTPServer(directory: "\(directory)/agent-repo")
        do {
            try await installsTheAgent(
                guest, image: "\(directory)/bookworm-\(guest.rawValue)-noagent.qcow2", http: http)
        } catch {
            await http.stop()
            throw error
        }
        await http.stop()
    }

    func installsTheAgent(_ guest: Guest, image: String, http: TestHTTPServer) async throws {
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        let cache = try TestPaths.makeTemporaryDirectory("dv-qemu-cache.")
        defer {
            TestPaths.removeTree(parent)
            TestPaths.removeTree(cache)
        }
        // cmd: runs the relay for each connection of the guest (a tcp: chardev would carry one).
        let relay = QemuCommands.escaped("\(TestPaths.repositoryRoot)/Tests/QemuBackendTests/Fixtures/loopback-relay")
        let network = "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:\(relay) \(http.port)"
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none",
                "--qemu-option", "-netdev", "--qemu-option", network,
                "--qemu-option", "-device", "--qemu-option", "virtio-net-pci,netdev=net0",
                // Room for a starved TCG guest: the boot, apt and the install all count.
                "--boot-timeout", "900", "--shutdown-timeout", "10", "--cache-dir", cache,
                "--dpkg-architecture", guest.rawValue, image,
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok")
        // Longer than the server's --boot-timeout and its clean-up after it, so that a boot or
        // install that does not end in time shows the server's own error and log (a CI run at
        // the busiest start of the suite once waited 960 s for a reply and showed nothing).
        let opened: String
        do {
            opened = try await server.request("open", timeout: .seconds(1140))
        } catch {
            Issue.record("no reply to open: \(error)\n\(server.standardError.suffix(20000))")
            throw error
        }
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        #expect(
            server.standardError.contains("qemu-guest-agent installed and started over the serial console"),
            "\(server.standardError)")
        #expect(
            http.requestedPaths.contains { $0.hasSuffix(".deb") && $0.contains("qemu-guest-agent_") },
            "the guest did not fetch the package from the test repository: \(http.requestedPaths)")

        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        func inGuest(_ argv: [String]) async throws -> CommandResult {
            try await runner.run(Command(argv: aux + argv), input: .none, output: .capture, error: .capture)
        }
        let status = try await inGuest(["dpkg-query", "-W", "-f", "${Status}", "qemu-guest-agent"])
        #expect(status.outputText == "install ok installed", "\(status.errorText)")
        #expect(try await inGuest(["id", "-u"]).outputText == "0")
        #expect(try await inGuest(["dpkg", "--print-architecture"]).outputText == guest.rawValue)
        // Logged out again: no session of root is left on the console (utmp; no procps in minbase).
        let who = try await inGuest(["who"])
        #expect(who.status == .exited(0) && !who.outputText.contains(guest.console), "who: \(who.outputText)")

        // The state saved after that boot has the agent: a revert restores it, installing nothing.
        #expect(try await server.request("revert", timeout: .seconds(960)).hasPrefix("ok /"), "\(server.standardError)")
        #expect(server.standardError.contains("restored the saved VM state"), "\(server.standardError)")
        let installs = server.standardError.components(separatedBy: "installed and started over the serial console")
        #expect(installs.count == 2, "the agent was installed \(installs.count - 1) times")
        let again = try await inGuest(["dpkg-query", "-W", "-f", "${Status}", "qemu-guest-agent"])
        #expect(again.outputText == "install ok installed", "\(again.errorText)")

        server.write(line: "quit")
        #expect(try await server.wait(timeout: .seconds(180)) == .exited(0), "\(server.standardError)")
        #expect(TestPaths.contents(of: parent) == [], "the instance directory was left behind")
        let leftover = try await runner.run(Command("pgrep", ["-f", parent]))
        #expect(leftover.outputText.isEmpty, "QEMU processes left behind: \(leftover.outputText)")
    }

    @Test(
        "without network the agent cannot be installed: open fails soon with an error naming qemu-guest-agent and apt-get, leaving nothing behind",
        .enabled(if: enabled), .guestSlot(minutes: 20))
    func noNetwork() async throws {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let parent = try TestPaths.makeTemporaryDirectory("dv-qemu-test.")
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess(
            [
                TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none",
                // A boot timeout far above what a starved boot takes (210 s once), so that failing
                // "soon" can be told from failing at the timeout.
                "--boot-timeout", "900", "--shutdown-timeout", "5", "\(directory)/bookworm-amd64-noagent.qcow2",
            ],
            environment: ["TMPDIR": parent])
        #expect(try await server.readLine() == "ok")
        let clock = ContinuousClock()
        let start = clock.now
        server.write(line: "open")
        #expect(try await server.wait(timeout: .seconds(960)) == .exited(12))
        // Well before the boot timeout.
        #expect(clock.now - start < .seconds(600), "took \(clock.now - start)")
        let text = server.standardError
        #expect(text.contains("the image needs qemu-guest-agent installed"), "\(text)")
        #expect(text.contains("installing it over the serial console failed"), "\(text)")
        #expect(text.contains("apt-get install qemu-guest-agent, which failed"), "\(text)")
        #expect(text.contains("--- end of the serial console"), "the console's end is shown: \(text)")
        #expect(TestPaths.contents(of: parent).isEmpty, "the instance directory was left behind")
        let leftover = try await runner.run(Command("pgrep", ["-f", parent]))
        #expect(leftover.outputText.isEmpty, "QEMU processes left behind: \(leftover.outputText)")
    }
}

@Suite("The agent's installation script")
struct AgentInstallScriptTests {
    @Test("the script typed on the console is one line of valid sh that installs, starts and reports")
    func script() async throws {
        #expect(!AgentInstall.script.contains("\n"))
        // A tty's canonical line is at most 4095 bytes.
        #expect(AgentInstall.script.utf8.count < 1000)
        for word in ["apt-get -q update", "install qemu-guest-agent", "systemctl start qemu-guest-agent"] {
            #expect(AgentInstall.script.contains(word))
        }
        let check = try await SubprocessRunner().run(Command("sh", ["-n", "-c", AgentInstall.script]))
        #expect(check.status == .exited(0), "\(check.errorText)")
    }
}

@Suite("What a guest runs before its state is saved")
struct SettleScriptTests {
    @Test("the settle script is valid sh, skips what the host lacks, and tells an unfinished start-up apart")
    func settleScript() async throws {
        let runner = SubprocessRunner()
        let check = try await runner.run(Command("sh", ["-n", "-c", QemuTestbed.settleScript]))
        #expect(check.status == .exited(0), "\(check.errorText)")
        // Where systemd is not running (this host's tests: no /run/systemd/system as PID 1 makes
        // it, or a guest without systemd), nothing is waited for and the script succeeds.
        if !FileManager.default.fileExists(atPath: "/run/systemd/system") {
            let plain = try await runner.run(Command("sh", ["-c", QemuTestbed.settleScript]))
            #expect(plain.status == .exited(0), "\(plain.errorText)")
        }
        // A systemctl whose wait runs out (timeout's 124) makes the script say so.
        let work = try TestPaths.makeTemporaryDirectory("dv-settle.")
        defer { TestPaths.removeTree(work) }
        try await TestPaths.writeExecutable("\(work)/timeout", "#!/bin/sh\nexit 124\n")
        let script = QemuTestbed.settleScript.replacingOccurrences(
            of: "[ -d /run/systemd/system ]", with: "[ -d / ]")
        let path = "\(work):\(ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")"
        let late = try await runner.run(Command("sh", ["-c", script], environment: ["PATH": path]))
        #expect(late.status == .exited(QemuTestbed.startUpUnfinished), "\(late.errorText)")
    }
}
