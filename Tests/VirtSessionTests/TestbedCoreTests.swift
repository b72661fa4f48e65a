import CommandRunner
import FixtureBackend
import Foundation
import Glibc
import Synchronization
import TestbedCore
import Testing
import VirtCore
import VirtTestSupport

/// The shared core (scratch directory, copy plumbing, reboot sequence) over the fixture
/// backend, checked on the files themselves.
@Suite("Shared testbed core")
struct TestbedCoreTests {
    let runner = SubprocessRunner()

    /// An opened controller over a fresh fixture, plus a host work directory; both removed after.
    func withTestbed(
        caps: String = "revert,reboot",
        _ body: (TestbedController, String, String) async throws -> Void
    ) async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        let host = try TestPaths.makeTemporaryDirectory("dv-host.")
        defer {
            TestPaths.removeTree(parent)
            TestPaths.removeTree(host)
        }
        let options = try FixtureTestbed.Options(words: ["parent=\(parent)", "caps=\(caps)"])
        let controller = TestbedController(backend: FixtureTestbed(options: options), copyTimeout: .seconds(120))
        let scratch = try await controller.open()
        do {
            try await body(controller, scratch, host)
        } catch {
            await controller.shutdown()
            throw error
        }
        await controller.shutdown()
        #expect(TestPaths.contents(of: parent) == [], "the testbed was not removed")
    }

    func write(_ path: String, _ text: String, mode: mode_t = 0o644) throws {
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        chmod(path, mode)
    }

    func mode(_ path: String) -> mode_t {
        var info = stat()
        return stat(path, &info) == 0 ? info.st_mode & 0o7777 : 0
    }

    @Test("the scratch directory is 0755, or 0777 when the testbed is isolated; revert keeps the path")
    func scratchModes() async throws {
        try await withTestbed { controller, scratch, _ in
            #expect(mode(scratch) == 0o755)
            let reverted = try await controller.revert()
            #expect(reverted == scratch)
            #expect(mode(scratch) == 0o755)
        }
        try await withTestbed(caps: "revert,isolation-container") { controller, scratch, _ in
            #expect(mode(scratch) == 0o777)
            let reverted = try await controller.revert()
            #expect(reverted == scratch)
            #expect(mode(scratch) == 0o777)
        }
    }

    @Test("a shutdown during an open returns only once the open has ended, with nothing it made left")
    func shutdownOutwaitsOpen() async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(parent) }
        // The fixture makes its directory only after the delay, whatever a close did meanwhile,
        // as a backend's boot may create files while a close removes them.
        let options = try FixtureTestbed.Options(words: ["parent=\(parent)", "open-delay=1", "open-ignores-close=1"])
        let controller = TestbedController(backend: FixtureTestbed(options: options))
        let clock = ContinuousClock()
        let started = clock.now
        let opening = Task { _ = try? await controller.open() }
        try await Task.sleep(for: .milliseconds(200))
        await controller.shutdown()
        // The process exits right after a signal's shutdown: what the open makes later stays.
        #expect(clock.now - started >= .seconds(1), "the shutdown returned while the open was still running")
        #expect(TestPaths.contents(of: parent) == [], "left after the shutdown")
        await opening.value
        #expect(TestPaths.contents(of: parent) == [])
    }

    @Test("revert throws away what was written in the testbed")
    func revertIsClean() async throws {
        try await withTestbed { controller, scratch, _ in
            try write("\(scratch)/state", "dirty")
            let reverted = try await controller.revert()
            #expect(reverted == scratch)
            #expect(!FileManager.default.fileExists(atPath: "\(scratch)/state"))
        }
    }

    @Test("reboot brings the scratch directory back after the testbed lost it, under a new boot id")
    func rebootKeepsScratch() async throws {
        try await withTestbed { controller, scratch, _ in
            try write("\(scratch)/kept file", "before reboot", mode: 0o750)
            try await controller.reboot(prepareOnly: false)
            #expect(try String(contentsOfFile: "\(scratch)/kept file", encoding: .utf8) == "before reboot")
            #expect(mode("\(scratch)/kept file") == 0o750)
            try await controller.reboot(prepareOnly: true)
            #expect(try String(contentsOfFile: "\(scratch)/kept file", encoding: .utf8) == "before reboot")
        }
    }

    @Test("file copies keep the content and the execute bit, both ways, with odd names")
    func fileCopies() async throws {
        try await withTestbed { controller, scratch, host in
            let name = "a b%c,d ü€ ✓"
            try write("\(host)/\(name)", "#!/bin/sh\necho hi\n", mode: 0o755)
            try write("\(host)/plain", "data", mode: 0o644)
            #expect(
                try await controller.copy(
                    .init(
                        direction: .down, hostPath: "\(host)/\(name)", testbedPath: "\(scratch)/\(name)",
                        isDirectory: false)) == .copied)
            #expect(
                try await controller.copy(
                    .init(
                        direction: .down, hostPath: "\(host)/plain", testbedPath: "\(scratch)/plain", isDirectory: false
                    )) == .copied)
            #expect(mode("\(scratch)/\(name)") & 0o111 != 0)
            #expect(mode("\(scratch)/plain") & 0o111 == 0)
            #expect(
                try await controller.copy(
                    .init(
                        direction: .up, hostPath: "\(host)/back", testbedPath: "\(scratch)/\(name)", isDirectory: false)
                ) == .copied)
            #expect(
                try await controller.copy(
                    .init(
                        direction: .up, hostPath: "\(host)/back-plain", testbedPath: "\(scratch)/plain",
                        isDirectory: false)) == .copied)
            #expect(try String(contentsOfFile: "\(host)/back", encoding: .utf8) == "#!/bin/sh\necho hi\n")
            #expect(mode("\(host)/back") & 0o111 != 0)
            #expect(mode("\(host)/back-plain") & 0o111 == 0)
            #expect(try String(contentsOfFile: "\(host)/back-plain", encoding: .utf8) == "data")
        }
    }

    @Test("directory copies merge into the target and keep modes, symlinks and odd names")
    func directoryCopies() async throws {
        try await withTestbed { controller, scratch, host in
            let tree = "\(host)/tree"
            try FileManager.default.createDirectory(atPath: "\(tree)/sub dir/ü", withIntermediateDirectories: true)
            try write("\(tree)/sub dir/ü/x y", "1", mode: 0o700)
            try write("\(tree)/top", "2")
            symlink("top", "\(tree)/link")
            try FileManager.default.createDirectory(atPath: "\(scratch)/target", withIntermediateDirectories: true)
            try write("\(scratch)/target/existing", "keep me")
            #expect(
                try await controller.copy(
                    .init(direction: .down, hostPath: "\(tree)/", testbedPath: "\(scratch)/target/", isDirectory: true))
                    == .copied)
            #expect(try String(contentsOfFile: "\(scratch)/target/existing", encoding: .utf8) == "keep me")
            #expect(try String(contentsOfFile: "\(scratch)/target/sub dir/ü/x y", encoding: .utf8) == "1")
            #expect(mode("\(scratch)/target/sub dir/ü/x y") == 0o700)
            #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(scratch)/target/link") == "top")
            let up = CopyRequest(
                direction: .up, hostPath: "\(host)/up/deeper/", testbedPath: "\(scratch)/target/", isDirectory: true)
            // Only the target directory is made, not its parents, as upstream; the client makes those.
            guard case .failed = try await controller.copy(up) else {
                Issue.record("a copyup into a missing parent directory succeeded")
                return
            }
            try FileManager.default.createDirectory(atPath: "\(host)/up", withIntermediateDirectories: false)
            #expect(try await controller.copy(up) == .copied)
            #expect(TestPaths.contents(of: "\(host)/up/deeper") == ["existing", "link", "sub dir", "top"])
        }
    }

    @Test("a tree of 2000 files and a 64 MiB random file copy down and back up byte for byte")
    func bulkCopies() async throws {
        try await withTestbed { controller, scratch, host in
            try await runner.check(
                Command(
                    "sh",
                    [
                        "-c",
                        #"mkdir -p "$1/many" && cd "$1/many" && for i in $(seq 1 2000); do echo "$i" > "file $i ü"; done"#,
                        "sh", host,
                    ]))
            try await runner.check(Command("sh", ["-c", #"head -c 67108864 /dev/urandom > "$1/big""#, "sh", host]))
            #expect(
                try await controller.copy(
                    .init(
                        direction: .down, hostPath: "\(host)/many/", testbedPath: "\(scratch)/many/", isDirectory: true)
                ) == .copied)
            #expect(
                try await controller.copy(
                    .init(direction: .down, hostPath: "\(host)/big", testbedPath: "\(scratch)/big", isDirectory: false))
                    == .copied)
            #expect(
                try await controller.copy(
                    .init(
                        direction: .up, hostPath: "\(host)/many-back/", testbedPath: "\(scratch)/many/",
                        isDirectory: true)) == .copied)
            #expect(
                try await controller.copy(
                    .init(
                        direction: .up, hostPath: "\(host)/big-back", testbedPath: "\(scratch)/big", isDirectory: false)
                ) == .copied)
            #expect(try await runner.run(Command("cmp", ["\(host)/big", "\(host)/big-back"])).status == .exited(0))
            #expect(
                try await runner.run(Command("diff", ["-r", "\(host)/many", "\(host)/many-back"])).status == .exited(0))
            #expect(TestPaths.contents(of: "\(host)/many-back").count == 2000)
        }
    }

    @Test(
        "copy failures are reported as failures, never as success",
        arguments: [
            (CopyRequest.Direction.down, "/nonexistent/file", "x", false),
            (.down, "/etc", "x", false),
            (.up, "host-file", "/nonexistent/file", false),
            (.down, "/nonexistent/dir/", "d/", true),
            (.up, "hostdir/", "/nonexistent/dir/", true),
            (.down, "/etc/os-release\u{0}", "x", false),
        ])
    func copyFailures(
        _ direction: CopyRequest.Direction, _ hostPath: String, _ testbedPath: String, _ isDirectory: Bool
    ) async throws {
        try await withTestbed { controller, scratch, host in
            let resolvedHost = hostPath.hasPrefix("/") ? hostPath : "\(host)/\(hostPath)"
            let resolvedTestbed = testbedPath.hasPrefix("/") ? testbedPath : "\(scratch)/\(testbedPath)"
            let outcome = try await controller.copy(
                .init(
                    direction: direction, hostPath: resolvedHost, testbedPath: resolvedTestbed, isDirectory: isDirectory
                ))
            guard case .failed = outcome else {
                Issue.record("expected a failure, got \(outcome)")
                return
            }
        }
    }

    @Test(
        "a file copy up that fails leaves the host's file as it was and nothing beside it; one that works replaces it")
    func failedCopyUpLosesNothing() async throws {
        try await withTestbed { controller, scratch, host in
            try write("\(host)/kept", "precious", mode: 0o600)
            let failed = try await controller.copy(
                .init(direction: .up, hostPath: "\(host)/kept", testbedPath: "\(scratch)/missing", isDirectory: false))
            guard case .failed = failed else {
                Issue.record("expected a failure, got \(failed)")
                return
            }
            #expect(try String(contentsOfFile: "\(host)/kept", encoding: .utf8) == "precious")
            #expect(mode("\(host)/kept") == 0o600)
            #expect(TestPaths.contents(of: host) == ["kept"])
            try write("\(scratch)/new", "fresh")
            #expect(
                try await controller.copy(
                    .init(direction: .up, hostPath: "\(host)/kept", testbedPath: "\(scratch)/new", isDirectory: false))
                    == .copied)
            #expect(try String(contentsOfFile: "\(host)/kept", encoding: .utf8) == "fresh")
            #expect(TestPaths.contents(of: host) == ["kept"])
            // Not a plain file: written in place, never replaced.
            #expect(
                try await controller.copy(
                    .init(direction: .up, hostPath: "/dev/null", testbedPath: "\(scratch)/new", isDirectory: false))
                    == .copied)
            var info = stat()
            #expect(stat("/dev/null", &info) == 0 && (info.st_mode & S_IFMT) == S_IFCHR, "/dev/null was replaced")
        }
    }

    @Test("a file copy up replaces a symbolic link at the destination, never writes through it; a file keeps its mode")
    func copyUpReplacesLinks() async throws {
        try await withTestbed { controller, scratch, host in
            try write("\(host)/outside", "host data", mode: 0o644)
            #expect(symlink("\(host)/outside", "\(host)/link") == 0)
            try write("\(scratch)/new", "from the testbed")
            #expect(
                try await controller.copy(
                    .init(direction: .up, hostPath: "\(host)/link", testbedPath: "\(scratch)/new", isDirectory: false))
                    == .copied)
            #expect(try String(contentsOfFile: "\(host)/outside", encoding: .utf8) == "host data")
            var info = stat()
            #expect(lstat("\(host)/link", &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG, "the link is still there")
            #expect(try String(contentsOfFile: "\(host)/link", encoding: .utf8) == "from the testbed")

            try write("\(host)/private", "secret", mode: 0o600)
            #expect(
                try await controller.copy(
                    .init(
                        direction: .up, hostPath: "\(host)/private", testbedPath: "\(scratch)/new", isDirectory: false))
                    == .copied)
            #expect(mode("\(host)/private") == 0o600, "the replaced file's mode was lost")
        }
    }

    /// Records each command and answers as a testbed would for a file copied up: `output` on
    /// the command's stdout, then `status`.
    final class FileSendingRunner: CommandRunner {
        let commands = Mutex<[[String]]>([])
        let output: [UInt8]
        let status: ProcessStatus

        init(output: [UInt8], status: ProcessStatus) {
            self.output = output
            self.status = status
        }

        func run(
            _ command: Command, input: CommandInput, output: CommandOutput, error: CommandOutput
        ) async throws(VirtError) -> CommandResult {
            commands.withLock { $0.append(command.argv) }
            if case .fileDescriptor(let fd, let closeAfterStart) = output {
                _ = self.output.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
                if closeAfterStart { close(fd) }
            }
            return CommandResult(status: status)
        }
    }

    @Test(
        "a file copy up goes through the testbed's file reader where it has one (3: executable), through the copy script where not"
    )
    func copyUpThroughFileReader() async throws {
        let host = try TestPaths.makeTemporaryDirectory("dv-host.")
        defer { TestPaths.removeTree(host) }
        let runner = FileSendingRunner(output: Array("the content\n".utf8), status: .exited(3))
        let testbed = InTestbed(auxverb: ["aux", "sock"], runner: runner)
        let reader = ["aux", "--read-file", "sock"]
        let up = CopyRequest(direction: .up, hostPath: "\(host)/a", testbedPath: "/tb/file", isDirectory: false)
        try await CopyPlumbing.copy(up, testbed.readingFiles(with: reader))
        #expect(runner.commands.withLock { $0 } == [reader + ["/tb/file"]])
        #expect(try String(contentsOfFile: "\(host)/a", encoding: .utf8) == "the content\n")
        var info = stat()
        #expect(stat("\(host)/a", &info) == 0 && info.st_mode & 0o111 != 0, "status 3 makes the copy executable")
        let plain = CopyRequest(direction: .up, hostPath: "\(host)/b", testbedPath: "/tb/file", isDirectory: false)
        try await CopyPlumbing.copy(plain, testbed)
        let script = try #require(runner.commands.withLock { $0.last })
        #expect(Array(script.prefix(4)) == ["aux", "sock", "/bin/sh", "-ec"])
        #expect(Array(script.suffix(2)) == ["sh", "/tb/file"])
        #expect(try String(contentsOfFile: "\(host)/b", encoding: .utf8) == "the content\n")
    }

    @Test("copy requests follow the protocol's rules on empty paths and trailing slashes")
    func copyRequestRules() throws {
        #expect(throws: VirtError.self) { try CopyRequest.fromProtocol(.down, source: "", destination: "/x") }
        #expect(throws: VirtError.self) { try CopyRequest.fromProtocol(.down, source: "/a/", destination: "/x") }
        let up = try CopyRequest.fromProtocol(.up, source: "/tb/", destination: "/host/")
        #expect(up == CopyRequest(direction: .up, hostPath: "/host/", testbedPath: "/tb/", isDirectory: true))
    }

    @Test("a relative host path is joined to the working directory, its trailing slash kept; the testbed path is kept")
    func relativeHostPaths() throws {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let cwd = String(cString: try #require(getcwd(&buffer, buffer.count)))
        let base = cwd == "/" ? "" : cwd
        let up = try CopyRequest.fromProtocol(.up, source: "rel/tb/", destination: "out/")
        #expect(up.hostPath == "out/", "the request keeps the path as sent until it is carried out")
        #expect(try up.resolvingHostPath().hostPath == "\(base)/out/")
        #expect(try up.resolvingHostPath().testbedPath == "rel/tb/")
        let down = try CopyRequest.fromProtocol(.down, source: "./pkg.dsc", destination: "/tmp/x")
        #expect(try down.resolvingHostPath().hostPath == "\(base)/./pkg.dsc")
        let absolute = try CopyRequest.fromProtocol(.down, source: "/a/b", destination: "c")
        #expect(try absolute.resolvingHostPath() == absolute)
    }
}

/// A testbed that is the host itself, seen through an auxverb that runs commands on the host,
/// whose revert and `learn` take as long as the test says.
final class HostTestbed: Testbed {
    /// How long a revert takes.
    let revertDelay = Mutex<Duration>(.zero)
    /// How long `learn` takes.
    let learnDelay = Mutex<Duration>(.zero)

    var auxverb: [String] { ["/usr/bin/env", "--"] }
    func capabilities() async -> [String] { [Capability.revert, Capability.isolationContainer] }
    func open() async throws(VirtError) -> [String] { auxverb }
    func revert() async throws(VirtError) -> [String] {
        try? await Task.sleep(for: revertDelay.withLock { $0 })
        return auxverb
    }
    func close() async {}
    func learn(_ testbed: InTestbed) async { try? await Task.sleep(for: learnDelay.withLock { $0 }) }
}

@Suite("Reverts and shutdowns")
struct RevertShutdownTests {
    /// A backend's revert may leave the new testbed up after the shutdown's close ran; the reply
    /// must not send the client on with it.
    @Test("a revert that a shutdown overtook fails with a clear error instead of replying a scratch path")
    func shutdownDuringRevert() async throws {
        let backend = HostTestbed()
        let controller = TestbedController(backend: backend)
        let scratch = try await controller.open()
        defer { TestPaths.removeTree(scratch) }
        backend.revertDelay.withLock { $0 = .seconds(1) }
        try await Self.expectRevertFails(controller, shutdownAfter: .milliseconds(200))
    }

    /// Starts a revert, shuts the controller down `delay` later, and expects the revert to fail
    /// saying so.
    static func expectRevertFails(_ controller: TestbedController, shutdownAfter delay: Duration) async throws {
        let reverting = Task { () async -> Result<String, VirtError> in
            do throws(VirtError) {
                return .success(try await controller.revert())
            } catch {
                return .failure(error)
            }
        }
        try await Task.sleep(for: delay)
        await controller.shutdown()
        guard case .failure(let error) = await reverting.value else {
            Issue.record("the revert replied a scratch directory after the shutdown")
            return
        }
        #expect(error.message.contains("shut down while reverting"), "\(error.message)")
    }

    /// A guest helper that answered its hello and then runs nothing, a container whose exec
    /// hangs: the open or revert fails naming what hung, and the command it ran is stopped.
    @Test("a testbed that came up but runs no command fails its open and its revert in bounded time")
    func stuckTestbed() async throws {
        final class StuckTestbed: Testbed {
            let marker = "dv-stuck-testbed-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            let stuck = Mutex(true)
            var auxverb: [String] {
                stuck.withLock { $0 }
                    ? ["/bin/sh", "-c", "while :; do sleep 1; done", marker] : ["/usr/bin/env", "--"]
            }
            func capabilities() async -> [String] { [Capability.revert, Capability.isolationContainer] }
            func open() async throws(VirtError) -> [String] { auxverb }
            func revert() async throws(VirtError) -> [String] { auxverb }
            func close() async {}
        }
        func expectTimedOut(_ backend: StuckTestbed, _ step: () async throws(VirtError) -> String) async throws {
            let started = ContinuousClock.now
            do {
                let scratch = try await step()
                Issue.record("replied \(scratch)")
            } catch {
                #expect(error.code == .timeout, "\(error)")
                #expect(
                    error.message.contains("creating the scratch directory in the new testbed timed out"), "\(error)")
            }
            #expect(ContinuousClock.now - started < .seconds(120))
            // The command the set-up ran went with the timeout.
            var left = ""
            for _ in 0..<100 {
                left = (try await SubprocessRunner().run(Command("pgrep", ["-f", backend.marker]))).outputText
                if left.isEmpty { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(left.isEmpty, "left running: \(left)")
        }
        // 20 s, not less: the revert's open must succeed, with its few host processes, in a CI
        // run's busy first phase.
        let opening = StuckTestbed()
        let first = TestbedController(backend: opening, setUpTimeout: .seconds(20))
        try await expectTimedOut(opening) { () throws(VirtError) in try await first.open() }
        await first.shutdown()

        let reverting = StuckTestbed()
        reverting.stuck.withLock { $0 = false }
        let second = TestbedController(backend: reverting, setUpTimeout: .seconds(20))
        let scratch = try await second.open()
        defer { TestPaths.removeTree(scratch) }
        reverting.stuck.withLock { $0 = true }
        try await expectTimedOut(reverting) { () throws(VirtError) in try await second.revert() }
        await second.shutdown()
    }

    @Test("only an absolute path of printable ASCII without spaces or % can be the scratch directory")
    func scratchPaths() {
        for path in ["/tmp/autopkgtest.AbC123", "/var/tmp/x-y_z.1"] {
            #expect(ScratchDirectory.isPlausible(path), "\(path)")
        }
        for path in ["", "tmp/a", "/tmp/a b", "/tmp/a%20b", "/tmp/a\tb", "/tmp/a\nb", "/tmp/a\r\nb", "/tmp/\u{e9}"] {
            #expect(!ScratchDirectory.isPlausible(path), "\(path.debugDescription)")
        }
    }
}

@Suite("suggested-normal-user")
struct NormalUserTests {
    @Test("the lowest uid in 1000-59999 is chosen; system users and nobody are not")
    func choosesLowestDynamicUser() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-normal-user.")
        defer { TestPaths.removeTree(work) }
        let passwd = """
            root:x:0:0:root:/root:/bin/bash
            nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
            zed:x:1002:1002::/home/zed:/bin/bash
            debci:x:1001:1001::/home/debci:/bin/bash
            _apt:x:42:65534::/nonexistent:/usr/sbin/nologin
            big:x:60000:60000::/home/big:/bin/sh

            """
        let getent = "\(work)/getent"
        try await TestPaths.writeExecutable(getent, "#!/bin/sh\ncat <<'EOF'\n\(passwd)EOF\n")
        let runner = SubprocessRunner()
        // What the testbed runs, with the fake getent in place of the testbed's.
        let argv = [getent] + NormalUser.argv.dropFirst()
        let found = try await runner.run(Command(argv: argv))
        #expect(NormalUser.parse(found) == "debci")

        try await TestPaths.writeExecutable(getent, "#!/bin/sh\necho root:x:0:0:root:/root:/bin/bash\n")
        let none = try await runner.run(Command(argv: argv))
        #expect(NormalUser.parse(none) == nil)

        // The lowest uid with a name that is not a plain user name: nothing is advertised.
        try await TestPaths.writeExecutable(
            getent,
            "#!/bin/sh\nprintf 'x\\tdowntmp-host=/tmp/p:x:1000:1000::/:/bin/sh\\ndebci:x:1001:1001::/:/bin/sh\\n'\n")
        let hostile = try await runner.run(Command(argv: argv))
        #expect(hostile.outputText.hasPrefix("x\tdowntmp-host=/tmp/p:"), "the fake getent gave the hostile name")
        #expect(NormalUser.parse(hostile) == nil)

        // A failed getent advertises nothing, whatever it printed.
        try await TestPaths.writeExecutable(getent, "#!/bin/sh\necho debci:x:1001:1001::/:/bin/sh\nexit 2\n")
        #expect(NormalUser.parse(try await runner.run(Command(argv: argv))) == nil)
    }

    @Test("ties go to the line first in byte order; lines without a numeric uid in range are skipped")
    func tiesAndOddLines() {
        let passwd = """
            bob:x:1500:1500::/home/bob:/bin/sh
            alice:x:1500:1500::/home/alice:/bin/sh
            short:x
            word:x:abc:1::/:/bin/sh
            high:x:59999:1::/:/bin/sh

            """
        #expect(NormalUser.parse(CommandResult(status: .exited(0), standardOutput: Array(passwd.utf8))) == "alice")
        let edge = "top:x:59999:1::/:/bin/sh\nlow:x:999:1::/:/bin/sh\nfirst:x:1000:1::/:/bin/sh"
        #expect(NormalUser.parse(CommandResult(status: .exited(0), standardOutput: Array(edge.utf8))) == "first")
        #expect(NormalUser.parse(CommandResult(status: .exited(0), standardOutput: [])) == nil)
    }

    @Test("the same user as autopkgtest-virt-qemu's and -incus's own pipeline chooses, for the same passwd")
    func sameAsReference() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-normal-user.")
        defer { TestPaths.removeTree(work) }
        let runner = SubprocessRunner()
        // autopkgtest 5.49's determine_normal_user(), as both servers run it in the testbed.
        let reference =
            "getent passwd | sort -t: -nk3 | awk -F: '{if ($3 >= 1000 && $3 <= 59999) { print $1; exit } }'"
        let path = "\(work):\(ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")"
        let samples = [
            "root:x:0:0::/root:/bin/sh\nzed:x:1002:1002::/:/bin/sh\ndebci:x:1001:1001::/:/bin/sh\n",
            "bob:x:1500:1::/:/bin/sh\nalice:x:1500:1::/:/bin/sh\nnobody:x:65534:1::/:/bin/sh\n",
            // A tie goes to the line first in byte order: "alice2:" before "alice:" (':' > '2').
            "alice:x:1500:1::/:/bin/sh\nalice2:x:1500:1::/:/bin/sh\na-b:x:1501:1::/:/bin/sh\n",
            // Blanks around a number: awk and sort -n read it all the same.
            "alice:x:1500:1::/:/bin/sh\nspaced:x: 1200 :1::/:/bin/sh\n",
            "big:x:60000:1::/:/bin/sh\nlow:x:999:1::/:/bin/sh\n",
            "top:x:59999:1::/:/bin/sh\nedge:x:1000:1::/:/bin/sh\nsys:x:100:1::/:/bin/sh\n",
        ]
        for sample in samples {
            try await TestPaths.writeExecutable("\(work)/getent", "#!/bin/sh\nprintf '%s' '\(sample)'\n")
            let theirs = try await runner.run(
                Command(argv: ["/bin/sh", "-c", reference]).with(environment: ["PATH": path, "LC_ALL": "C"]))
            let ours = try await runner.run(Command(argv: ["\(work)/getent"] + NormalUser.argv.dropFirst()))
            #expect(NormalUser.parse(ours) == (theirs.outputText.isEmpty ? nil : theirs.outputText), "\(sample)")
        }
    }

    @Test("only names Debian's NAME_REGEX allows are plain user names (no whitespace, no `$`, 32 at most)")
    func plainUserNames() {
        for name in ["debci", "a", "a-b_c9", String(repeating: "u", count: 32)] {
            #expect(NormalUser.isPlainUserName(name), "\(name)")
        }
        for name in [
            "", "x\tdowntmp-host=/x", "x y", "x\ny", "Debci", "9lives", "_apt", "-x", "machine$", "é",
            String(repeating: "u", count: 33),
        ] {
            #expect(!NormalUser.isPlainUserName(name), "\(name)")
        }
    }
}

extension Command {
    fileprivate func with(environment: [String: String?]) -> Command {
        var copy = self
        copy.environment = environment
        return copy
    }
}

/// `Testbed.learn`: what a backend reads from a new testbed runs beside the scratch directory's
/// creation, and the reply waits for it.
@Suite("What the backend learns beside the scratch directory")
struct LearnTests {
    /// A host testbed with a private TMPDIR, whose commands wait (300 s at most) for a marker
    /// that `learn` makes before it waits (330 s at most) for the scratch directory: each of the
    /// two can only go on while the other runs. (Generous bounds: in a CI run's first phase the
    /// learn task once waited more than 10 s for a thread of the busy cooperative pool, and
    /// once more than 60 s.)
    final class WatchingTestbed: Testbed {
        let temporary: String
        var marker: String { "\(temporary).learning" }
        /// What each `learn` saw: whether the scratch directory came while it waited, and
        /// whether it was cancelled (as an `async let` left unawaited is).
        let learned = Mutex<[(sawScratch: Bool, cancelled: Bool)]>([])

        init(temporary: String) { self.temporary = temporary }

        var auxverb: [String] {
            [
                "/bin/sh", "-c",
                #"i=0; while [ ! -e "$0" ] && [ $i -lt 30000 ]; do sleep 0.01; i=$((i+1)); done; [ -e "$0" ] || exit 99; TMPDIR="$1"; export TMPDIR; shift 2; exec "$@""#,
                marker, temporary, "--",
            ]
        }
        func capabilities() async -> [String] { [Capability.revert, Capability.isolationContainer] }
        func open() async throws(VirtError) -> [String] { auxverb }
        func revert() async throws(VirtError) -> [String] { auxverb }
        func close() async {}
        func learn(_ testbed: InTestbed) async {
            _ = FileManager.default.createFile(atPath: marker, contents: nil)
            defer { unlink(marker) }
            let deadline = ContinuousClock.now + .seconds(330)
            var seen = false
            while !seen && ContinuousClock.now < deadline {
                seen = !TestPaths.contents(of: temporary).isEmpty
                if !seen { try? await Task.sleep(for: .milliseconds(10)) }
            }
            // Slower than the scratch directory: the reply must still wait for it.
            try? await Task.sleep(for: .milliseconds(300))
            let cancelled = Task.isCancelled
            learned.withLock { $0.append((seen, cancelled)) }
        }
    }

    @Test("open runs the backend's learn beside the scratch directory's creation, and open and revert reply after it")
    func learnBesideScratch() async throws {
        let temporary = try TestPaths.makeTemporaryDirectory("dv-learn.")
        defer { TestPaths.removeTree(temporary) }
        let backend = WatchingTestbed(temporary: temporary)
        let controller = TestbedController(backend: backend)
        let scratch = try await controller.open()
        #expect(scratch.hasPrefix(temporary + "/"), "\(scratch)")
        var learned = backend.learned.withLock { $0 }
        #expect(learned.map(\.sawScratch) == [true], "learn did not see the scratch directory being made")
        #expect(learned.map(\.cancelled) == [false], "open did not wait for learn")
        // Gone before the revert, so that the revert's learn waits for it to be made again (an
        // existing one would end that learn, and with it the marker, before the revert's command
        // had looked for the marker: a command started late then waited for it in vain, ci91).
        try #require(rmdir(scratch) == 0, "cannot remove \(scratch)")
        #expect(try await controller.revert() == scratch)
        #expect(access(scratch, F_OK) == 0, "the revert did not make the scratch directory again")
        learned = backend.learned.withLock { $0 }
        #expect(learned.count == 2 && learned.allSatisfy { !$0.cancelled }, "revert did not wait for learn")
        #expect(learned.map(\.sawScratch) == [true, true], "the revert's learn did not see the scratch directory made")
        await controller.shutdown()
    }

    @Test("a revert whose backend was still learning when a shutdown came fails instead of replying a scratch path")
    func shutdownWhileLearning() async throws {
        let backend = HostTestbed()
        let controller = TestbedController(backend: backend)
        let scratch = try await controller.open()
        defer { TestPaths.removeTree(scratch) }
        backend.learnDelay.withLock { $0 = .seconds(1) }
        try await RevertShutdownTests.expectRevertFails(controller, shutdownAfter: .milliseconds(300))
    }
}
