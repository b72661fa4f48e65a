import CommandRunner
import Foundation
import GuestHelper
import Testing
import VirtCore
import VirtTestSupport

@testable import IncusBackend

/// The guest helper's channel to an Incus instance, with the real helper, relay and auxverb
/// client, and an `incus` whose `exec` runs its command on the host (so the commands here are
/// harmless ones). With real instances: IncusServerTests.
@Suite("the guest helper over incus exec's stdio")
struct HelperChannelTests {
    /// A directory with a fake `incus`: `exec ... -- ARGV` runs ARGV here; once `nopython`
    /// exists, python3 is missing as in an image without it (incus's message and status); with
    /// `fail-once`, the next python3 exec fails as a flaky exec does (and the file goes); with
    /// `slow`, the helper never says hello (30 s).
    struct Host {
        let directory: String
        let cli: IncusCLI

        init() throws {
            directory = try TestPaths.makeTemporaryDirectory("dv-helper-channel.")
            let fake = "\(directory)/incus"
            try Data(
                """
                #!/bin/sh
                echo "$*" >> "${0%/*}/calls"
                while [ "$1" != -- ]; do shift; done
                shift
                if [ "$1" = python3 ] && [ -e "${0%/*}/nopython" ]; then
                    echo 'Error: Command not found' >&2
                    exit 127
                fi
                if [ "$1" = python3 ] && rm "${0%/*}/fail-once" 2>/dev/null; then
                    echo 'Error: Failed to retrieve PID of executing child process' >&2
                    exit 1
                fi
                if [ "$1" = python3 ] && [ -e "${0%/*}/slow" ]; then
                    exec sleep 30
                fi
                exec "$@"
                """.utf8
            ).write(to: URL(fileURLWithPath: fake))
            chmod(fake, 0o755)
            cli = IncusCLI(executable: fake)
        }

        var helperStarts: Int {
            let calls = (try? String(contentsOfFile: "\(directory)/calls", encoding: .utf8)) ?? ""
            return calls.split(separator: "\n").filter { $0.contains(" -- python3 ") }.count
        }

        func touch(_ name: String) {
            _ = FileManager.default.createFile(atPath: "\(directory)/\(name)", contents: nil)
        }

        func run(_ channel: HelperChannel, _ argv: [String]) async throws -> CommandResult {
            try await SubprocessRunner().run(
                Command(argv: [TestPaths.executable("debusine-virt-auxverb"), channel.relay.socketPath] + argv),
                input: .none, output: .capture, error: .capture)
        }
    }

    @Test("the helper runs as python3 with a short loader, the program's size, its version and --stdio")
    func commandLine() {
        let argv = HelperChannel.command(IncusCLI(), "debusine-virt-x").argv
        #expect(
            argv
                == ["incus", "exec", "--force-noninteractive", "debusine-virt-x", "--", "python3", "-c"]
                + [GuestHelperScript.stdioLoader, String(GuestHelperScript.source.utf8.count)]
                + ["--version", GuestHelperScript.version, "--stdio"])
        #expect(GuestHelperScript.stdioLoader.utf8.count < 1024, "the process list shows the loader, not the program")
    }

    @Test(
        "commands run through the helper; a helper killed inside is started again; stop fails commands at once; a new instance gets a new helper; close leaves nothing",
        .timeLimit(.minutes(2)))
    func lifecycle() async throws {
        let host = try Host()
        defer { TestPaths.removeTree(host.directory) }
        let channel = try HelperChannel(cli: host.cli, runner: SubprocessRunner(), parent: host.directory)
        #expect(await channel.start(in: "first"))
        let hello = try await host.run(channel, ["sh", "-c", "echo hello; echo oops >&2; exit 7"])
        #expect(hello.status == .exited(7) && hello.outputText == "hello" && hello.errorText == "oops")

        // The command's parent is the helper.
        let helperPID = try await host.run(channel, ["sh", "-c", "echo $PPID"]).outputText
        let killed = try await host.run(channel, ["sh", "-c", "kill -9 $PPID; sleep 5"])
        #expect(killed.status == .exited(255), "the helper's end fails the command in flight")
        let back = await Deadline(after: .seconds(20)).poll(every: .milliseconds(200)) { () async -> Bool in
            (try? await host.run(channel, ["true"]))?.status == .exited(0)
        }
        #expect(back, "a new helper within 20 s")
        let newPID = try await host.run(channel, ["sh", "-c", "echo $PPID"]).outputText
        #expect(newPID != helperPID && !newPID.isEmpty)
        #expect(host.helperStarts == 2)

        await channel.stop()
        let stopped = try await host.run(channel, ["true"])
        #expect(stopped.status == .exited(255))
        #expect(kill(pid_t(newPID) ?? 0, 0) != 0, "the helper of a stopped channel is gone")

        #expect(await channel.start(in: "second"))
        #expect(try await host.run(channel, ["echo", "again"]).outputText == "again")
        let lastPID = try await host.run(channel, ["sh", "-c", "echo $PPID"]).outputText
        await channel.close()
        #expect(access(channel.relay.socketPath, F_OK) != 0)
        #expect(access(channel.directory, F_OK) != 0)
        #expect(kill(pid_t(lastPID) ?? 0, 0) != 0, "no helper left after close")
        #expect(await !channel.start(in: "third"), "nothing starts once closed")
    }

    @Test("an instance without python3: start says no once, and later instances are not tried again")
    func noPython() async throws {
        let host = try Host()
        defer { TestPaths.removeTree(host.directory) }
        host.touch("nopython")
        let channel = try HelperChannel(cli: host.cli, runner: SubprocessRunner(), parent: host.directory)
        #expect(await !channel.start(in: "first"))
        #expect(await !channel.start(in: "second"))
        #expect(host.helperStarts == 1)
        let result = try await host.run(channel, ["true"])
        #expect(result.status == .exited(255), "no helper, so the relay refuses: \(result.errorText)")
        await channel.close()
        #expect(access(channel.directory, F_OK) != 0)
    }

    @Test("an exec that fails once for another reason than python3 leaves the next instance its helper")
    func transientFailure() async throws {
        let host = try Host()
        defer { TestPaths.removeTree(host.directory) }
        host.touch("fail-once")
        let channel = try HelperChannel(cli: host.cli, runner: SubprocessRunner(), parent: host.directory)
        #expect(await !channel.start(in: "first"))
        #expect(await channel.start(in: "second"))
        #expect(try await host.run(channel, ["echo", "up"]).outputText == "up")
        await channel.close()
    }

    @Test(
        "a shutdown while a start waits for the helper's hello ends the start without its timeout, and nothing starts after it"
    )
    func shutdownWhileStarting() async throws {
        let host = try Host()
        defer { TestPaths.removeTree(host.directory) }
        host.touch("slow")
        let channel = try HelperChannel(cli: host.cli, runner: SubprocessRunner(), parent: host.directory)
        let starting = Task { await channel.start(in: "first") }
        try await Task.sleep(for: .milliseconds(300))
        await channel.shutdown()
        // The start's wait for a hello ends with the stream it waited on, not at its 30 s
        // timeout. (Measured from here: in a full test run, tasks of the stop can wait seconds
        // for a thread of the busy cooperative pool.)
        let clock = ContinuousClock()
        let stopped = clock.now
        #expect(await !starting.value)
        #expect(clock.now - stopped < .seconds(20), "not the hello's 30 s timeout: \(clock.now - stopped)")
        #expect(await !channel.start(in: "second"))
        await channel.close()
        #expect(access(channel.directory, F_OK) != 0)
    }

    @Test("a relay that cannot listen fails the start at once, and later instances go without a helper")
    func relayCannotListen() async throws {
        let host = try Host()
        defer { TestPaths.removeTree(host.directory) }
        let channel = try HelperChannel(cli: host.cli, runner: SubprocessRunner(), parent: host.directory)
        // Its private directory gone, the relay cannot bind its socket.
        TestPaths.removeTree(channel.directory)
        // (How long it takes is not asserted: the first phase of CI kept such a start busy for
        // 18 s once, longer than the 15 s the start gives a failed exec to report its end.)
        #expect(await !channel.start(in: "first"))
        let calls = host.helperStarts
        #expect(await !channel.start(in: "second"))
        #expect(host.helperStarts == calls, "no helper is started for a relay that failed")
        await channel.close()
    }

    @Test(
        "a relay directory names its server; gc removes those of servers that have ended, and nothing else",
        .timeLimit(.minutes(1)))
    func orphanedRelayDirectories() async throws {
        let parent = try TestPaths.makeTemporaryDirectory("dv-relay-gc.")
        defer { TestPaths.removeTree(parent) }
        let channel = try HelperChannel(cli: IncusCLI(), runner: SubprocessRunner(), parent: parent)
        let started = try #require(LiveProcess.startTime(of: getpid()))
        let claimed = try String(contentsOfFile: "\(channel.directory)/owner", encoding: .utf8)
        #expect(claimed == "\(getpid())\n\(started)\n", "the pid, then its start time")

        // A live server: a process whose command line names the program.
        let server = try ServerProcess(["/bin/sh", "-c", "sleep 60", "debusine-virt-incus"])
        defer { server.signal(SIGKILL) }
        func relayDirectory(owner: String?, age: Int = 0, extra: String? = nil) throws -> String {
            let directory = try PrivateDirectory.make(in: parent, prefix: "dvi.")
            try Data().write(to: URL(fileURLWithPath: "\(directory)/auxverb.sock"))
            if let owner { try Data(owner.utf8).write(to: URL(fileURLWithPath: "\(directory)/owner")) }
            if let extra { try Data().write(to: URL(fileURLWithPath: "\(directory)/\(extra)")) }
            if age > 0 {
                let then = timeval(tv_sec: time(nil) - age, tv_usec: 0)
                #expect(utimes(directory, [then, then]) == 0)
            }
            return directory
        }
        let live = try relayDirectory(owner: "\(server.pid)\n\(LiveProcess.startTime(of: server.pid) ?? "")\n")
        // An owner file without a start time, as older servers wrote: the pid must run the program.
        let liveOlder = try relayDirectory(owner: "\(server.pid)\n")
        let dead = try relayDirectory(owner: "\(Int32.max - 7)\n1\n")
        let otherDead = try relayDirectory(owner: "\(Int32.max - 9)\n")
        // This test's own pid, started at another time: a recycled pid.
        let recycled = try relayDirectory(owner: "\(getpid())\n1\n")
        // This test's own pid without a start time: it is not a server.
        let notAServer = try relayDirectory(owner: "\(getpid())\n")
        let fresh = try relayDirectory(owner: nil)
        let old = try relayDirectory(owner: nil, age: 120)
        // No owner file, but someone listens on the socket: in use.
        let listened = try PrivateDirectory.make(in: parent, prefix: "dvi.")
        let listener = try TestSockets.listen(at: "\(listened)/auxverb.sock")
        defer { close(listener) }
        let then = timeval(tv_sec: time(nil) - 120, tv_usec: 0)
        #expect(utimes(listened, [then, then]) == 0)
        let notOurs = try relayDirectory(owner: "\(Int32.max - 7)\n", extra: "precious")
        let otherPrefix = try PrivateDirectory.make(in: parent, prefix: "dvq.")

        // The death watch's run: that server's alone.
        #expect(HelperChannel.collectOrphans(parent: parent, owner: Int32.max - 9) == ["removed \(otherDead)"])
        let report = HelperChannel.collectOrphans(parent: parent)
        #expect(Set(report) == Set([dead, recycled, notAServer, old].map { "removed \($0)" }), "\(report)")
        for gone in [dead, otherDead, recycled, notAServer, old] {
            #expect(access(gone, F_OK) != 0, "\(gone)")
        }
        for kept in [channel.directory, live, liveOlder, fresh, listened, notOurs, otherPrefix] {
            #expect(access(kept, F_OK) == 0, "\(kept)")
        }
        await channel.close()
        #expect(access(channel.directory, F_OK) != 0, "close removes the owner file and the directory")
    }

    @Test("a TMPDIR too long for the relay's socket path is refused before anything is made")
    func socketPathTooLong() throws {
        let parent = "/tmp/" + String(repeating: "d", count: 90)
        #expect(throws: VirtError.self) {
            _ = try HelperChannel(cli: IncusCLI(), runner: SubprocessRunner(), parent: parent)
        }
    }
}
