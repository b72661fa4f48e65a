import CommandRunner
import Foundation
import IncusBackend
import Testing
import VirtCore
import VirtTestSupport

/// Error paths of debusine-virt-incus that a real incusd will not produce on demand, against a
/// fake `incus` first on PATH (Fixtures/fake-incus). The real daemon is in IncusServerTests.
@Suite("debusine-virt-incus error paths with a fake incus")
struct FakeIncusTests {
    /// A private state directory, a PATH whose `incus` is the fake, and the server started on it.
    struct Fake {
        let state: String
        let server: ServerProcess

        /// `arguments` go before the image, `after` after it (launch arguments). `hanging`: the
        /// `hangs` scenario's incusd has stopped answering before the server starts.
        init(_ scenario: String, _ arguments: [String] = [], after: [String] = [], hanging: Bool = false) throws {
            state = try TestPaths.makeTemporaryDirectory("dv-fake-incus.")
            if hanging { _ = FileManager.default.createFile(atPath: state + "/hang", contents: nil) }
            let bin = state + "/bin"
            try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: false)
            try FileManager.default.createSymbolicLink(
                atPath: bin + "/incus",
                withDestinationPath: "\(TestPaths.repositoryRoot)/Tests/IncusBackendTests/Fixtures/fake-incus")
            let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
            server = try ServerProcess(
                [TestPaths.executable("debusine-virt-incus")] + arguments + ["artifact/1"] + after,
                environment: [
                    "PATH": "\(bin):\(path)", "FAKE_INCUS_STATE": state, "FAKE_INCUS_SCENARIO": scenario,
                    "TMPDIR": state,
                ])
        }

        var calls: [String] {
            ((try? String(contentsOfFile: state + "/calls", encoding: .utf8)) ?? "").split(separator: "\n").map(
                String.init)
        }

        var instances: [String] { TestPaths.contents(of: state).filter { $0.hasPrefix("instance.") } }

        func request(_ line: String) async throws -> String? {
            server.write(line: line)
            return try await server.readLine(timeout: .seconds(60))
        }

        func cleanUp() { TestPaths.removeTree(state) }
    }

    @Test("a launch that fails after creating the instance: open fails with incus's reason, the instance is deleted")
    func launchFailsAfterCreate() async throws {
        let fake = try Fake("launch-fails")
        defer { fake.cleanUp() }
        #expect(try await fake.server.readLine() == "ok")
        #expect(try await fake.request("open") == nil)
        #expect(try await fake.server.wait() == .exited(12))
        #expect(fake.server.standardError.contains("fake start failure"), "\(fake.server.standardError)")
        #expect(fake.calls.contains { $0.hasPrefix("delete debusine-virt-") }, "\(fake.calls)")
        #expect(fake.instances.isEmpty)
    }

    @Test("exec that only returns CLI errors: open times out with the instance's log, and deletes the instance")
    func execFails() async throws {
        let fake = try Fake("exec-fails", ["--boot-timeout", "2"])
        defer { fake.cleanUp() }
        #expect(try await fake.server.readLine() == "ok")
        #expect(try await fake.request("open") == nil)
        #expect(try await fake.server.wait() == .exited(12))
        let stderr = fake.server.standardError
        #expect(stderr.contains("did not finish booting within 2"), "\(stderr)")
        #expect(stderr.contains("Failed to retrieve PID"), "the last CLI error is in the message: \(stderr)")
        #expect(stderr.contains("fake log line"), "the instance's log is in the message: \(stderr)")
        #expect(fake.instances.isEmpty, "\(fake.calls)")
    }

    /// The instance names in calls like `VERB NAME ...`.
    func names(_ calls: [String], _ verb: String) -> [String] {
        calls.compactMap { call in
            let words = call.split(separator: " ")
            return words.count > 2 && words[0] == Substring(verb) ? String(words[2]) : nil
        }
    }

    /// A whole session with one revert: open, revert, close, quit, each answered as it should be.
    func openRevertClose(_ fake: Fake) async throws {
        #expect(try await fake.server.readLine() == "ok")
        #expect(try await fake.request("open")?.hasPrefix("ok /") == true, "\(fake.server.standardError)")
        #expect(try await fake.request("revert")?.hasPrefix("ok /") == true, "\(fake.server.standardError)")
        #expect(try await fake.request("close") == "ok")
        #expect(try await fake.request("quit") == nil)
        #expect(try await fake.server.wait() == .exited(0))
    }

    @Test(
        "with --eager-spare a spare is made while the testbed runs; revert starts it instead of launching; close deletes the next one"
    )
    func spare() async throws {
        // At once, not when the host is quiet: this host may be busy for the whole test.
        let fake = try Fake("", ["--eager-spare"])
        defer { fake.cleanUp() }
        try await openRevertClose(fake)
        let calls = fake.calls
        let launched = calls.filter { $0.hasPrefix("launch ") }
        let made = names(calls, "init")
        #expect(launched.count == 1, "only open launches: \(calls)")
        try #require(made.count == 2, "a spare after open and one after revert: \(calls)")
        // A spare is the instance a launch would make: ephemeral, labelled for gc.
        for call in calls where call.hasPrefix("init ") {
            #expect(call.hasPrefix("init artifact/1 debusine-virt-"), "\(call)")
            #expect(call.contains("--ephemeral") && call.contains("user.debusine-virt.pid="), "\(call)")
        }
        #expect(calls.contains("start \(made[0]) --quiet"), "revert starts the first spare: \(calls)")
        #expect(calls.contains("delete \(made[1]) --force"), "close deletes the unused spare: \(calls)")
        #expect(fake.instances.isEmpty, "\(calls)")
    }

    @Test("a spare that does not start is deleted and revert launches instead; --no-spare makes none")
    func spareFails() async throws {
        for (scenario, arguments) in [("start-fails", [String]()), ("", ["--no-spare"])] {
            let fake = try Fake(scenario, arguments)
            defer { fake.cleanUp() }
            try await openRevertClose(fake)
            let calls = fake.calls
            #expect(calls.filter { $0.hasPrefix("launch ") }.count == 2, "\(scenario): \(calls)")
            if scenario == "start-fails" {
                #expect(fake.server.standardError.contains("did not start"), "\(fake.server.standardError)")
            } else {
                #expect(!calls.contains { $0.hasPrefix("init ") }, "--no-spare made one: \(calls)")
            }
            #expect(fake.instances.isEmpty, "\(scenario): \(calls)")
        }
    }

    @Test("a graceful stop that times out is followed by a forced stop; close still succeeds")
    func stopTimesOut() async throws {
        let fake = try Fake("stop-hangs", ["--stop-timeout", "1"])
        defer { fake.cleanUp() }
        #expect(try await fake.server.readLine() == "ok")
        let opened = try #require(try await fake.request("open"), "\(fake.server.standardError)")
        #expect(opened.hasPrefix("ok /"))
        #expect(try await fake.request("close") == "ok")
        let calls = fake.calls
        let graceful = try #require(
            calls.firstIndex { $0.hasPrefix("stop debusine-virt-") && $0.hasSuffix("--timeout 1") })
        let forced = try #require(calls.firstIndex { $0.hasPrefix("stop debusine-virt-") && $0.hasSuffix("--force") })
        #expect(graceful < forced)
        #expect(fake.server.standardError.contains("did not stop within 1 s"), "\(fake.server.standardError)")
        #expect(fake.instances.isEmpty)
        fake.server.write(line: "quit")
        #expect(try await fake.server.wait() == .exited(0))
    }

    @Test("incusd going away mid-session: the next request fails clearly, and the leftover is reported for gc")
    func daemonGoesAway() async throws {
        let fake = try Fake("daemon-gone")
        defer { fake.cleanUp() }
        #expect(try await fake.server.readLine() == "ok")
        let opened = try #require(try await fake.request("open"), "\(fake.server.standardError)")
        #expect(opened.hasPrefix("ok /"))
        #expect(FileManager.default.createFile(atPath: fake.state + "/gone", contents: nil))
        #expect(try await fake.request("revert") == nil)
        #expect(try await fake.server.wait() == .exited(12))
        let stderr = fake.server.standardError
        #expect(stderr.contains("incusd is not running"), "\(stderr)")
        #expect(stderr.contains("debusine-virt-incus gc"), "the leftover instance is reported: \(stderr)")
    }

    @Test(
        "an incusd that stops answering: start, revert and close each end within their time limits, naming the command that hung; no incus client is left waiting",
        .timeLimit(.minutes(3)))
    func daemonStopsAnswering() async throws {
        // The server's, that is: its death watch's `gc` waits on the hung incusd too (for two
        // minutes, as a `gc` run by hand does), and is stopped here.
        func hungClients(_ fake: Fake) async throws -> [String] {
            let watch = "gc --owner \(fake.server.pid)"
            func processes() -> [pid_t] { (DirectoryEntries.names(in: "/proc") ?? []).compactMap { pid_t($0) } }
            let hung = processes().filter { pid in
                guard (SmallFile.text("/proc/\(pid)/cmdline") ?? "").hasPrefix("fake-incus-hung \(fake.state)"),
                    let parent = LiveProcess.parent(of: pid)
                else { return false }
                return !(SmallFile.text("/proc/\(parent)/cmdline") ?? "").contains(watch.replacing(" ", with: "\0"))
            }
            _ = try await SubprocessRunner().run(Command("pkill", ["-f", "\(watch)$"]))
            // What the watch's `gc` had started goes with it, whatever it had come to (looked
            // for again: it may have started more since the first look).
            let started = "FAKE_INCUS_STATE=\(fake.state)"
            for pid in processes() {
                guard let environment = SmallFile.text("/proc/\(pid)/environ") else { continue }
                if environment.split(separator: "\0").contains(Substring(started)) { kill(pid, SIGKILL) }
            }
            return hung.map(String.init)
        }
        // A revert: the old instance's delete and the new launch both hang.
        let reverting = try Fake("hangs", ["--boot-timeout", "3", "--no-spare"])
        defer { reverting.cleanUp() }
        #expect(try await reverting.server.readLine() == "ok")
        #expect(try await reverting.request("open")?.hasPrefix("ok /") == true, "\(reverting.server.standardError)")
        #expect(FileManager.default.createFile(atPath: reverting.state + "/hang", contents: nil))
        let started = ContinuousClock.now
        #expect(try await reverting.request("revert") == nil)
        #expect(try await reverting.server.wait() == .exited(12))
        #expect(ContinuousClock.now - started < .seconds(60))
        var stderr = reverting.server.standardError
        #expect(stderr.contains("`incus delete debusine-virt-"), "\(stderr)")
        #expect(stderr.contains("timed out after 3 s"), "\(stderr)")
        #expect(stderr.contains("debusine-virt-incus gc"), "the leftover instance is reported: \(stderr)")
        #expect(try await hungClients(reverting).isEmpty)

        // A close: the graceful stop, the forced one and the delete all hang.
        let closing = try Fake("hangs", ["--boot-timeout", "3", "--stop-timeout", "1", "--no-spare"])
        defer { closing.cleanUp() }
        #expect(try await closing.server.readLine() == "ok")
        #expect(try await closing.request("open")?.hasPrefix("ok /") == true, "\(closing.server.standardError)")
        #expect(FileManager.default.createFile(atPath: closing.state + "/hang", contents: nil))
        #expect(try await closing.request("close") == "ok")
        closing.server.write(line: "quit")
        #expect(try await closing.server.wait() == .exited(0))
        stderr = closing.server.standardError
        #expect(stderr.contains("did not stop within 1 s"), "\(stderr)")
        #expect(stderr.contains("could not delete the instance debusine-virt-"), "\(stderr)")
        #expect(try await hungClients(closing).isEmpty)

        // Before the banner: the preflight's first question hangs. The server says so and exits
        // instead of leaving its client waiting for a banner.
        let starting = try Fake("hangs", ["--boot-timeout", "3"], hanging: true)
        defer { starting.cleanUp() }
        let launched = ContinuousClock.now
        #expect(try await starting.server.readLine() == nil, "no banner")
        #expect(try await starting.server.wait() != .exited(0))
        #expect(ContinuousClock.now - launched < .seconds(60))
        stderr = starting.server.standardError
        #expect(stderr.contains("`incus image info artifact/1` timed out after 3 s: is incusd answering?"), "\(stderr)")
        #expect(try await hungClients(starting).isEmpty)
    }

    /// With /proc mounted hidepid=2, a worker's gc cannot see another user's server, and must
    /// not take it for dead; an instance of another machine that shares the host name is not
    /// this gc's either (issue 14, item 10).
    @Test(
        "gc run by a user /proc hides others from deletes only instances of dead servers on this machine",
        .enabled(if: getuid() == 0, "needs root to mount a proc with hidepid and to run as another user"))
    func gcSparesHiddenAndForeignOwners() async throws {
        let state = try TestPaths.makeTemporaryDirectory("dv-fake-incus.")
        defer { TestPaths.removeTree(state) }
        #expect(chmod(state, 0o777) == 0)
        let bin = state + "/bin"
        try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: false)
        try FileManager.default.createSymbolicLink(
            atPath: bin + "/incus",
            withDestinationPath: "\(TestPaths.repositoryRoot)/Tests/IncusBackendTests/Fixtures/fake-incus")

        // The live owner gc cannot see: a process of a user other than the one gc runs as.
        let sleeper = try ServerProcess([
            "/usr/bin/setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "/bin/sleep", "600",
        ])
        defer { sleeper.signal(SIGKILL) }
        let start = try #require(LiveProcess.startTime(of: sleeper.pid))
        let exited = try ServerProcess(["/bin/true"])
        #expect(try await exited.wait() == .exited(0))
        let me = InstanceOwner.current()
        try #require(!me.machineID.isEmpty, "this machine has no /etc/machine-id")
        let owners: [(String, InstanceOwner)] = [
            (
                "debusine-virt-live",
                InstanceOwner(host: me.host, machineID: me.machineID, pid: sleeper.pid, startTime: start)
            ),
            (
                "debusine-virt-dead",
                InstanceOwner(host: me.host, machineID: me.machineID, pid: exited.pid, startTime: "1")
            ),
            (
                "debusine-virt-elsewhere",
                InstanceOwner(
                    host: me.host, machineID: String(repeating: "0", count: 32), pid: exited.pid, startTime: "1")
            ),
        ]
        let listing = owners.map { name, owner -> [String: Any] in
            ["name": name, "config": Dictionary(uniqueKeysWithValues: owner.labels().map { ($0.key, $0.value) })]
        }
        try JSONSerialization.data(withJSONObject: listing).write(to: URL(fileURLWithPath: state + "/list.json"))
        for (name, _) in owners {
            #expect(FileManager.default.createFile(atPath: "\(state)/instance.\(name)", contents: nil))
        }

        let path = "\(bin):\(ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")"
        let gc = try await SubprocessRunner().run(
            Command(
                "unshare",
                [
                    "--mount", "--fork", "sh", "-c",
                    #"mount -t proc -o hidepid=2 proc /proc && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@""#,
                    "sh", "env", "PATH=\(path)", "HOME=\(state)", "FAKE_INCUS_STATE=\(state)",
                    TestPaths.executable("debusine-virt-incus"), "gc",
                ]))
        #expect(gc.status == .exited(0), "\(gc.errorText)")
        let calls = ((try? String(contentsOfFile: state + "/calls", encoding: .utf8)) ?? "").split(separator: "\n")
        let deletes = calls.filter { $0.hasPrefix("delete ") }
        #expect(deletes == ["delete debusine-virt-dead --force"], "\(calls)\n\(gc.outputText)\(gc.errorText)")
    }

    @Test("the first open deletes instances of this machine's dead servers, and no live or foreign server's")
    func startUpSweep() async throws {
        let fake = try Fake("")
        defer { fake.cleanUp() }
        #expect(try await fake.server.readLine() == "ok")
        let exited = try ServerProcess(["/bin/true"])
        #expect(try await exited.wait() == .exited(0))
        let me = InstanceOwner.current()
        try #require(!me.machineID.isEmpty, "this machine has no /etc/machine-id")
        let owners: [(String, InstanceOwner)] = [
            ("debusine-virt-mine", me),
            ("debusine-virt-live", InstanceOwner.current()),
            (
                "debusine-virt-dead",
                InstanceOwner(host: me.host, machineID: me.machineID, pid: exited.pid, startTime: "1")
            ),
            (
                "debusine-virt-elsewhere",
                InstanceOwner(
                    host: me.host, machineID: String(repeating: "0", count: 32), pid: exited.pid, startTime: "1")
            ),
            (
                "debusine-virt-other-host",
                InstanceOwner(host: "elsewhere", machineID: "", pid: exited.pid, startTime: "1")
            ),
            // Which machine it was on is unknown (labels from before machine ids): `gc` may take
            // it, a sweep nobody asked for does not.
            (
                "debusine-virt-unproven",
                InstanceOwner(host: me.host, machineID: "", pid: exited.pid, startTime: "1")
            ),
        ]
        let listing = owners.map { name, owner -> [String: Any] in
            ["name": name, "config": Dictionary(uniqueKeysWithValues: owner.labels().map { ($0.key, $0.value) })]
        }
        try JSONSerialization.data(withJSONObject: listing).write(to: URL(fileURLWithPath: fake.state + "/list.json"))
        for (name, _) in owners {
            #expect(FileManager.default.createFile(atPath: "\(fake.state)/instance.\(name)", contents: nil))
        }
        #expect(try await fake.request("open")?.hasPrefix("ok /") == true, "\(fake.server.standardError)")
        let deadline = ContinuousClock.now + .seconds(30)
        while !fake.calls.contains("delete debusine-virt-dead --force") && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(try await fake.request("close") == "ok")
        #expect(try await fake.request("quit") == nil)
        #expect(try await fake.server.wait() == .exited(0))
        let swept = fake.calls.filter { $0.hasPrefix("delete debusine-virt-") && !$0.contains("debusine-virt-test") }
            .filter { call in owners.contains { call.hasPrefix("delete \($0.0) ") } }
        #expect(swept == ["delete debusine-virt-dead --force"], "\(fake.calls)")
        #expect(
            fake.server.standardError.contains("start-up sweep: deleted instance debusine-virt-dead"),
            "\(fake.server.standardError)")
    }

    @Test("a missing image or profile is an error before the banner that says what to do")
    func preflight() async throws {
        let state = try TestPaths.makeTemporaryDirectory("dv-fake-incus.")
        defer { TestPaths.removeTree(state) }
        let bin = state + "/bin"
        try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: false)
        // An incus that knows neither images nor profiles.
        let script =
            "#!/bin/sh\ncase \"$1 $2\" in 'image info') echo 'Error: Image not found' >&2 ;; *) echo 'Error: Profile not found' >&2 ;; esac\nexit 1\n"
        try await TestPaths.writeExecutable(bin + "/incus", script)
        let path = "\(bin):\(ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")"
        let server = try ServerProcess(
            [TestPaths.executable("debusine-virt-incus"), "artifact/404"], environment: ["PATH": path])
        #expect(try await server.readLine() == nil, "no banner")
        #expect(try await server.wait() == .exited(1))
        #expect(server.standardError.contains("debusine-virt-incus import"), "\(server.standardError)")

        let other = try ServerProcess(
            [TestPaths.executable("debusine-virt-incus"), "--remote", "r", "x:artifact/1"], environment: ["PATH": path])
        #expect(try await other.readLine() == nil)
        #expect(try await other.wait() == .exited(64))
        #expect(other.standardError.contains("--remote"), "\(other.standardError)")
    }
}
