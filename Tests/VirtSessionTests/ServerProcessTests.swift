import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtSession
import VirtTestSupport

/// The built executables driven as the clients drive them: real processes, real pipes.
@Suite("Server processes")
struct ServerProcessTests {
    static let fixtureServer = TestPaths.executable("virt-fixture-server")

    @Test("each reply is flushed at once while stdin stays open, as autopkgtest waits for it")
    func repliesAreFlushedImmediately() async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess([Self.fixtureServer, "--fixture", "parent=\(parent)"])
        // A block-buffered stdout would hold these lines back and the reads would time out.
        #expect(try await server.readLine(timeout: .seconds(60)) == "ok")
        server.write(line: "capabilities")
        #expect(try await server.readLine(timeout: .seconds(60)) == "ok revert reboot")
        server.write(line: "open")
        let opened = try #require(try await server.readLine(timeout: .seconds(60)))
        #expect(opened.hasPrefix("ok /"))
        server.write(line: "print-execute-command")
        let auxverb = try #require(try await server.readLine(timeout: .seconds(60)))
        #expect(auxverb.hasPrefix("ok env,TMPDIR%3D/"))
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0))
        #expect(try await server.readLine() == nil)
        #expect(TestPaths.contents(of: parent) == [])
    }

    @Test(
        "SIGTERM, SIGINT and SIGHUP in an open session clean up the testbed, then kill the server by that signal",
        arguments: [SIGTERM, SIGINT, SIGHUP])
    func signalWhileOpenCleansUp(_ signal: Int32) async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(parent) }
        let events = "\(parent).events"
        defer { unlink(events) }
        let server = try ServerProcess([
            Self.fixtureServer, "--fixture", "parent=\(parent)", "--fixture", "event-log=\(events)",
        ])
        #expect(try await server.readLine() == "ok")
        server.write(line: "open")
        #expect(try await server.readLine()?.hasPrefix("ok /") == true)
        #expect(TestPaths.contents(of: parent).count == 1)
        server.signal(signal)
        #expect(try await server.wait() == .signaled(signal))
        #expect(try String(contentsOfFile: events, encoding: .utf8) == "open\nclose\n")
        #expect(TestPaths.contents(of: parent) == [], "the testbed directory was left behind")
    }

    @Test("a signal while the testbed is still opening cleans up what open started")
    func signalWhileOpening() async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(parent) }
        let events = "\(parent).events"
        defer { unlink(events) }
        let server = try ServerProcess([
            Self.fixtureServer, "--fixture", "parent=\(parent)", "--fixture", "event-log=\(events)",
            "--fixture", "open-delay=30",
        ])
        #expect(try await server.readLine() == "ok")
        server.write(line: "open")
        try await waitUntil { (try? String(contentsOfFile: events, encoding: .utf8)) == "open\n" }
        server.signal(SIGTERM)
        #expect(try await server.wait(timeout: .seconds(60)) == .signaled(SIGTERM))
        // The close stops the open; the shutdown closes once more after it, in case the open
        // made something before it stopped.
        #expect(try String(contentsOfFile: events, encoding: .utf8) == "open\nclose\nclose\n")
        #expect(try await server.readLine() == nil, "no reply may follow the banner")
        #expect(TestPaths.contents(of: parent) == [])
    }

    @Test("a last request without a newline is still served, then end of file exits 12")
    func lastLineWithoutNewline() async throws {
        let server = try ServerProcess([Self.fixtureServer])
        #expect(try await server.readLine() == "ok")
        server.write(Array("capabilities".utf8))
        server.closeStandardInput()
        #expect(try await server.readLine() == "ok revert reboot")
        #expect(try await server.wait() == .exited(12))
        #expect(server.standardError.contains("end of file"))
    }

    @Test("a request line over 1 MiB ends the session with exit 12 instead of eating memory")
    func hugeLineIsRefused() async throws {
        let server = try ServerProcess([Self.fixtureServer])
        #expect(try await server.readLine() == "ok")
        server.write([UInt8](repeating: UInt8(ascii: "a"), count: 3 << 20))
        #expect(try await server.wait() == .exited(12))
        #expect(server.standardError.contains("longer than"))
        #expect(try await server.readLine() == nil)
    }

    @Test("a client that stops reading replies makes the server clean up and die by SIGPIPE")
    func clientGoneGivesSigpipe() async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(parent) }
        let server = try ServerProcess([Self.fixtureServer, "--fixture", "parent=\(parent)"])
        #expect(try await server.readLine() == "ok")
        server.write(line: "open")
        #expect(try await server.readLine()?.hasPrefix("ok /") == true)
        server.closeReplies()
        // A request at a time until the server is gone: a child that this test process is
        // spawning holds every descriptor of it, the closed reply pipe's read end too, until it
        // execs, and a reply written meanwhile finds a reader. The next one meets none.
        let ended = await Deadline(after: .seconds(60)).poll(every: .milliseconds(200)) { () -> ProcessStatus? in
            if let status = server.endedStatus { return status }
            server.write(line: "capabilities")
            return nil
        }
        #expect(ended == .signaled(SIGPIPE))
        #expect(try await server.wait() == .signaled(SIGPIPE))
        #expect(TestPaths.contents(of: parent) == [])
    }

    @Test("debusine-virt-incus with a bad command line fails before the banner with a usage error")
    func incusBadCommandLine() async throws {
        let server = try ServerProcess([
            TestPaths.executable("debusine-virt-incus"), "--boot-timeout", "0", "artifact/1",
        ])
        #expect(try await server.wait() == .exited(64))
        #expect(try await server.readLine() == nil, "nothing may reach stdout")
        #expect(server.standardError.contains("timeouts must be positive"), "\(server.standardError)")
    }

    @Test("debusine-virt-qemu with a missing image fails before the banner and names the image")
    func qemuMissingImage() async throws {
        let server = try ServerProcess([TestPaths.executable("debusine-virt-qemu"), "/nonexistent/image.qcow2"])
        #expect(try await server.wait() == .exited(1))
        #expect(try await server.readLine() == nil, "nothing may reach stdout")
        #expect(server.standardError.contains("/nonexistent/image.qcow2 does not exist"))
    }

    @Test("debusine-virt-qemu rejects a bad --accel value before the banner")
    func qemuBadOption() async throws {
        let server = try ServerProcess([TestPaths.executable("debusine-virt-qemu"), "--accel", "warp", "/etc/hostname"])
        #expect(try await server.wait() == .exited(64))
        #expect(try await server.readLine() == nil)
        #expect(server.standardError.contains("warp"))
    }

    @Test(
        "a missing image argument is a usage error before any banner",
        arguments: ["debusine-virt-qemu", "debusine-virt-incus"])
    func usageErrorBeforeBanner(_ executable: String) async throws {
        let server = try ServerProcess([TestPaths.executable(executable)])
        let status = try await server.wait()
        #expect(status != .exited(0))
        #expect(try await server.readLine() == nil)
        #expect(server.standardError.contains("Missing expected argument"))
    }
}

/// Polls `condition` every 10 ms for up to 10 s.
func waitUntil(_ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(60)
    while !condition() {
        guard ContinuousClock.now < deadline else {
            Issue.record("condition not met within 10 s")
            return
        }
        try await Task.sleep(for: .milliseconds(10))
    }
}

@Suite("Death watch")
struct DeathWatchTests {
    /// The watcher's argv with `touch MARKER` as the clean-up, fed `input` and then end of file.
    func watch(_ input: String) async throws -> Bool {
        let work = try TestPaths.makeTemporaryDirectory("dv-watch.")
        defer { TestPaths.removeTree(work) }
        let argv = DeathWatch.argv(executable: "/usr/bin/touch", arguments: ["\(work)/marker"])
        #expect(argv.prefix(2) == ["/bin/sh", "-c"])
        #expect(argv.suffix(2) == ["/usr/bin/touch", "\(work)/marker"], "the clean-up is argv, not shell code")
        let result = try await SubprocessRunner().run(
            Command(argv: argv), input: .bytes(Array(input.utf8)), output: .discard, error: .capture)
        #expect(result.status == .exited(0), "\(result.errorText)")
        return access("\(work)/marker", F_OK) == 0
    }

    @Test("the clean-up runs at end of file, whatever came before it")
    func watcher() async throws {
        #expect(try await watch(""), "the clean-up did not run")
        #expect(try await watch("anything\nat all"), "the clean-up did not run after input")
    }

    @Test("the clean-up does not run while the pipe is open")
    func waits() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-watch.")
        defer { TestPaths.removeTree(work) }
        let watcher = try ServerProcess(DeathWatch.argv(executable: "/usr/bin/touch", arguments: ["\(work)/marker"]))
        try await Task.sleep(for: .milliseconds(500))
        #expect(access("\(work)/marker", F_OK) != 0, "the clean-up ran while the server lived")
        watcher.closeStandardInput()
        #expect(try await watcher.wait() == .exited(0))
        #expect(access("\(work)/marker", F_OK) == 0, "the clean-up did not run at end of file")
    }
}
