import CommandRunner
import Foundation
import IncusBackend
import Testing
import VirtCore
import VirtTestSupport

/// debusine-virt-incus against the real incusd, as autopkgtest runs it: the built executable
/// over real pipes, launching containers of the project-built tarball imported as artifact/1
/// (scripts/test runs `setup` and `import` first and sets DEBUSINE_VIRT_INCUS_IMAGE).
@Suite("debusine-virt-incus with a real incusd", .serialized)
struct IncusServerTests {
    static let image = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_INCUS_IMAGE"]
    static let enabled = image != nil || TestPaths.isCI
    /// The i386 system tarball imported as artifact/2 (`scripts/build-test-images --arch i386`).
    static let i386Image = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_INCUS_I386_IMAGE"]

    let runner = SubprocessRunner()

    func requireImage() throws -> String {
        try #require(Self.image, "DEBUSINE_VIRT_INCUS_IMAGE is not set: run through scripts/test")
    }

    /// The instances labelled with `pid` as their server.
    func instances(ownedBy pid: pid_t, environment: [String: String?] = [:]) async throws -> [String] {
        let listing = try await runner.check(
            Command("incus", ["list", "debusine-virt-", "--format", "json"], environment: environment))
        let value = try JSONSerialization.jsonObject(with: Data(listing.utf8)) as? [[String: Any]] ?? []
        return value.compactMap { instance in
            let configuration = instance["config"] as? [String: Any] ?? [:]
            guard configuration["user.debusine-virt.pid"] as? String == String(pid) else { return nil }
            return instance["name"] as? String
        }
    }

    @Test(
        "--statistics-file: whole JSON after every verb; a process holding 300 MiB shows in the container's memory peak; nothing left",
        .enabled(if: enabled), .timeLimit(.minutes(10)))
    func statisticsFile() async throws {
        let image = try requireImage()
        let output = try TestPaths.makeTemporaryDirectory("dv-statistics.")
        defer { TestPaths.removeTree(output) }
        let path = "\(output)/statistics.json"
        let server = try ServerProcess([TestPaths.executable("debusine-virt-incus"), "--statistics-file", path, image])
        let pid = server.pid
        try await StatisticsSession.run(server, path: path, backend: "incus-lxc", image: image, privateDisk: false)
        #expect(try await instances(ownedBy: pid).isEmpty, "instances left behind")
    }

    @Test(
        "a whole session: capabilities, auxverb contract, streaming, copies, revert, reboot, close; nothing left",
        .enabled(if: enabled), .timeLimit(.minutes(10)))
    func wholeSession() async throws {
        let image = try requireImage()
        let host = try TestPaths.makeTemporaryDirectory("dv-incus-host.")
        defer { TestPaths.removeTree(host) }
        // -d: the log says which path each command took.
        let server = try ServerProcess([TestPaths.executable("debusine-virt-incus"), "-d", image])
        #expect(try await server.readLine() == "ok")
        let opened = try await server.request("open")
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        let scratch = String(opened.dropFirst(3))
        let capabilities = try await server.request("capabilities")
        #expect(
            capabilities == "ok revert revert-full-system reboot root-on-testbed isolation-container",
            "the test image has no normal user, so no suggested-normal-user")

        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        func inside(_ argv: [String], input: CommandInput = .none) async throws -> CommandResult {
            try await runner.run(
                Command(argv: aux + argv), input: input, output: .capture(limit: 16 << 20), error: .capture)
        }
        // The image has python3: commands go through the guest helper, on a socket of the
        // server's own private directory, and the wrapper gives them a root login's environment.
        let socket = aux.count == 4 ? aux[1] : ""
        #expect(
            aux == [
                TestPaths.executable("debusine-virt-auxverb"), socket, "/var/lib/debusine-virt/auxverb", "--login",
            ],
            "\(aux)")
        var socketDirectory = stat()
        #expect(stat((socket as NSString).deletingLastPathComponent, &socketDirectory) == 0)
        #expect(socketDirectory.st_mode & 0o777 == 0o700)
        #expect(!server.standardError.contains("no guest helper"), "\(server.standardError)")
        #expect(try await inside(["stat", "-c", "%a", scratch]).outputText == "777")
        #expect(try await inside(["sh", "-c", "exit 3"]).status == .exited(3))
        #expect(try await inside(["sh", "-c", "exit 255"]).status == .exited(253))
        #expect(try await inside(["sh", "-c", "kill -9 $$"]).status == .exited(137))
        #expect(try await inside(["no-such-command"]).status == .exited(127))
        let words = ["a b", "", "ü€", "$(id)", "%2C,x", "-n"]
        #expect(try await inside(["printf", "[%s]"] + words).outputText == words.map { "[\($0)]" }.joined())
        // The environment of a root login, not incus exec's.
        let environment = try await inside(["env"]).outputText.split(separator: "\n").map(String.init)
        #expect(environment.contains("HOME=/root"))
        #expect(environment.contains("LOGNAME=root"))
        #expect(environment.contains { $0.hasPrefix("PATH=") && $0.contains("/usr/sbin") })
        // Where `incus exec` starts commands, as on the path without the helper.
        #expect(try await inside(["pwd"]).outputText == "/root")
        // A leaked background process holding stdout does not hang the call.
        let clock = ContinuousClock()
        let started = clock.now
        let leaked = try await inside(["sh", "-c", "sleep 600 & echo started"])
        #expect(leaked.outputText == "started")
        #expect(clock.now - started < .seconds(30))
        _ = try await inside(["pkill", "-x", "sleep"])
        // stderr and stdout stay apart.
        let both = try await inside(["sh", "-c", "echo out; echo err >&2"])
        #expect(both.outputText == "out" && both.errorText == "err")

        // 64 MiB through stdin and back through stdout.
        let source = "\(host)/source"
        try await runner.check(Command("sh", ["-c", #"head -c 67108864 /dev/urandom > "$1""#, "sh", source]))
        let input = open(source, O_RDONLY)
        try #require(input >= 0)
        let up = try await inside(
            ["sh", "-c", "cat > /root/big"], input: .fileDescriptor(input, closeAfterStart: true))
        #expect(up.status == .exited(0), "\(up.errorText)")
        let back = "\(host)/back"
        let output = open(back, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(output >= 0)
        let down = try await runner.run(
            Command(argv: aux + ["cat", "/root/big"]), input: .none,
            output: .fileDescriptor(output, closeAfterStart: true),
            error: .capture)
        #expect(down.status == .exited(0))
        #expect(try await runner.run(Command("cmp", [source, back])).status == .exited(0))

        // Four at once.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<4 {
                group.addTask {
                    let result = try await runner.run(Command(argv: aux + ["sh", "-c", "sleep 1; echo \(index)"]))
                    #expect(result.outputText == "\(index)", "\(result.status): \(result.errorText)")
                }
            }
            try await group.waitForAll()
        }

        // copydown and copyup of a tree with odd names, through the protocol.
        let tree = "\(host)/tree ü, %"
        try await runner.check(
            Command(
                "sh",
                [
                    "-ec",
                    #"mkdir -p "$1/sub dir"; for i in $(seq 1 200); do echo "$i" > "$1/sub dir/file $i ü"; done; cp "$2" "$1/big""#,
                    "sh", tree, source,
                ]))
        func encode(_ path: String) -> String {
            path.utf8.map { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                    || "/._-".utf8.contains(byte)
                    ? String(UnicodeScalar(byte)) : "%" + String(byte, radix: 16, uppercase: true)
            }.joined()
        }
        let logBefore = server.standardError.count
        #expect(try await server.request("copydown \(encode(tree))/ \(encode(scratch))/tree/") == "ok")
        // Copies take an incus exec of their own (the faster path for bulk data), not the helper.
        let copyLog = server.standardError.dropFirst(logBefore)
        #expect(copyLog.contains("/var/lib/debusine-virt/auxverb --framed"), "\(copyLog)")
        #expect(!copyLog.contains("--login"), "\(copyLog)")
        #expect(
            try await inside(["sh", "-c", "ls \"$1/sub dir\" | wc -l", "sh", "\(scratch)/tree"]).outputText == "200")
        let copiedBack = "\(host)/back tree"
        #expect(try await server.request("copyup \(encode(scratch))/tree/ \(encode(copiedBack))/") == "ok")
        #expect(try await runner.run(Command("diff", ["-r", tree, copiedBack])).status == .exited(0))

        // revert: a new instance (its helper on the same socket), the marker gone.
        try await runner.check(Command(argv: aux + ["touch", "/root/marker"]))
        func instanceName(_ auxverb: [String]) async throws -> String {
            try await runner.check(Command(argv: auxverb + ["cat", "/proc/sys/kernel/hostname"]))
        }
        let firstName = try await instanceName(aux)
        #expect(firstName.hasPrefix("debusine-virt-"), "\(firstName)")
        #expect(try await server.request("revert") == "ok \(scratch)")
        #expect(try await server.request("capabilities") == capabilities, "no duplicated words after revert")
        let reverted = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        #expect(reverted == aux)
        let secondName = try await instanceName(reverted)
        #expect(secondName != firstName && secondName.hasPrefix("debusine-virt-"))
        #expect(try await runner.run(Command(argv: reverted + ["test", "-e", "/root/marker"])).status == .exited(1))
        #expect(
            server.standardError.contains("starting the spare \(secondName)"),
            "the revert started a spare:\n\(server.standardError)")
        let gone = try await runner.run(Command("incus", ["info", firstName]))
        #expect(!gone.status.succeeded, "the first instance was deleted")

        // reboot: the scratch directory survives, the instance really restarted.
        try await runner.check(Command(argv: reverted + ["sh", "-c", "echo kept > \"$1/kept\"", "sh", scratch]))
        let before = try await runner.check(Command(argv: reverted + ["sh", "-c", "cut -d' ' -f22 /proc/1/stat"]))
        #expect(try await server.request("reboot") == "ok")
        let after = try await runner.check(Command(argv: reverted + ["sh", "-c", "cut -d' ' -f22 /proc/1/stat"]))
        #expect(before != after, "init restarted")
        #expect(try await runner.check(Command(argv: reverted + ["cat", "\(scratch)/kept"])) == "kept")

        // A test that kills the helper (its commands' parent) fails its own command; the server
        // starts another in the instance.
        let killed = try await runner.run(Command(argv: reverted + ["sh", "-c", "kill -9 $PPID; sleep 5"]))
        #expect(killed.status == .exited(255))
        let helperBack = await Deadline(after: .seconds(30)).poll(every: .milliseconds(250)) { () async -> Bool in
            (try? await runner.run(Command(argv: reverted + ["true"])))?.status == .exited(0)
        }
        #expect(helperBack, "a new helper within 30 s")

        #expect(try await server.request("close") == "ok")
        #expect(try await instances(ownedBy: server.pid).isEmpty)
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0))
        #expect(access(socket, F_OK) != 0, "the relay's socket is gone")
        #expect(access((socket as NSString).deletingLastPathComponent, F_OK) != 0, "and its directory")
    }

    @Test(
        "without a guest helper (--no-guest-helper, or an image without python3) every command is an incus exec; the server says why once",
        .enabled(if: enabled), .timeLimit(.minutes(10)))
    func withoutGuestHelper() async throws {
        let image = try requireImage()
        // The same image without python3, published from an instance of it.
        let builder = "debusine-virt-test-nopython-\(getpid())"
        let derived = "debusine-virt-test/nopython-\(getpid())"
        try await runner.check(Command("incus", ["launch", image, builder, "--profile", "debusine", "--quiet"]))
        do {
            try await runner.check(Command("incus", ["exec", builder, "--", "sh", "-c", "rm -f /usr/bin/python3*"]))
            try await runner.check(Command("incus", ["stop", builder]))
            try await runner.check(
                Command("incus", ["publish", builder, "--alias", derived, "--compression", "none", "--quiet"]))
        } catch {
            _ = try? await runner.run(Command("incus", ["delete", "--force", builder]))
            throw error
        }
        _ = try? await runner.run(Command("incus", ["delete", "--force", builder]))

        do {
            for (arguments, reason) in [(["--no-guest-helper", image], nil), ([derived], "Command not found")] {
                let server = try ServerProcess([TestPaths.executable("debusine-virt-incus")] + arguments)
                #expect(try await server.readLine() == "ok")
                #expect(try await server.request("open").hasPrefix("ok /"), "\(server.standardError)")
                for verb in ["revert", "revert"] {
                    let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
                    #expect(aux.count > 2 && aux[1] == "--exec", "\(arguments): \(aux)")
                    let result = try await runner.run(Command(argv: aux + ["sh", "-c", "echo $HOME; pwd; exit 3"]))
                    #expect(result.status == .exited(3) && result.outputText == "/root\n/root")
                    #expect(try await server.request(verb).hasPrefix("ok /"))
                }
                #expect(try await server.request("close") == "ok")
                server.write(line: "quit")
                #expect(try await server.wait() == .exited(0))
                let said = server.standardError.components(separatedBy: "no guest helper in").count - 1
                if let reason {
                    #expect(said == 1, "said once:\n\(server.standardError)")
                    #expect(
                        server.standardError.contains(
                            ": exit status 127: Error: \(reason) (the helper needs python3 in the image)"),
                        "\(server.standardError)")
                } else {
                    #expect(said == 0, "\(server.standardError)")
                }
                #expect(try await instances(ownedBy: server.pid).isEmpty)
            }
        } catch {
            _ = try? await runner.run(Command("incus", ["image", "delete", derived]))
            throw error
        }
        _ = try? await runner.run(Command("incus", ["image", "delete", derived]))
    }

    @Test(
        "debusine's `artifact/ID -- --profile debusine` opens with the profile once, runs a command and reverts",
        .enabled(if: enabled), .timeLimit(.minutes(10)))
    func debusineLaunchArguments() async throws {
        let image = try requireImage()
        let server = try ServerProcess([
            TestPaths.executable("debusine-virt-incus"), image, "--", "--profile", "debusine",
        ])
        #expect(try await server.readLine() == "ok", "\(server.standardError)")
        let opened = try await server.request("open")
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        func check() async throws {
            let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
            let result = try await runner.run(Command(argv: aux + ["sh", "-c", "echo hello; id -u"]))
            #expect(result.outputText == "hello\n0", "\(result.errorText)")
            let name = try await runner.check(Command(argv: aux + ["cat", "/proc/sys/kernel/hostname"]))
            #expect(name.hasPrefix("debusine-virt-"))
            let profiles = try await runner.check(
                Command("incus", ["list", name, "--format", "csv", "--columns", "P"]))
            #expect(profiles == "debusine", "\(profiles)")
        }
        try await check()
        #expect(try await server.request("revert") == opened, "\(server.standardError)")
        try await check()
        #expect(try await server.request("close") == "ok")
        #expect(try await instances(ownedBy: server.pid).isEmpty)
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0))
    }

    // The amd64 fixture run is `scripts/main-job --incus`'s, which CI runs before this suite and
    // which checks the same things; a run here repeated it.

    @Test(
        "an i386 container on this amd64 host runs the examples/ fixture package under autopkgtest with the expected summary",
        .enabled(if: i386Image != nil || TestPaths.isCI), .timeLimit(.minutes(15)))
    func autopkgtestFixtureI386() async throws {
        let image = try #require(
            Self.i386Image, "DEBUSINE_VIRT_INCUS_I386_IMAGE is not set: run through scripts/test")
        let log = try await runFixture(image: image)
        // autopkgtest asks the testbed itself (dpkg --print-architecture through the auxverb).
        #expect(log.contains("testbed dpkg architecture: i386"), "\(log.suffix(4000))")
        // The container runs 32-bit executables (ELF class 1) under the i686 personality.
        let server = try ServerProcess([TestPaths.executable("debusine-virt-incus"), image])
        #expect(try await server.readLine() == "ok")
        #expect(try await server.request("open").hasPrefix("ok /"), "\(server.standardError)")
        let auxverb = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        let seen = try await runner.check(
            Command(argv: auxverb + ["sh", "-c", "uname -m; dpkg --print-architecture; od -An -tx1 -j4 -N1 /bin/true"]))
        #expect(
            seen.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) } == ["i686", "i386", "01"],
            "\(seen)")
        #expect(try await server.request("close") == "ok")
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0), "\(server.standardError)")
        #expect(try await instances(ownedBy: server.pid).isEmpty)
    }

    /// autopkgtest with the fixture package against debusine-virt-incus IMAGE: the expected
    /// summary, the oddly named artifact copied up, no instance left. Returns autopkgtest's log.
    func runFixture(image: String) async throws -> String {
        let work = try TestPaths.makeTemporaryDirectory("dv-autopkgtest.")
        defer { TestPaths.removeTree(work) }
        // Orphans a killed earlier run left on this machine are not this run's to answer for.
        let before = Set(try await IncusGarbageCollector().orphans().map(\.name))
        let result = try await FixturePackage.run(
            server: [TestPaths.executable("debusine-virt-incus"), image], work: work)
        // Every server autopkgtest started is gone, and none left an instance behind.
        let orphans = try await IncusGarbageCollector().orphans().map(\.name).filter { !before.contains($0) }
        #expect(orphans.isEmpty, "left behind: \(orphans)")
        return result.errorText
    }

    @Test(
        "by default no spare is made while the host is busy; a revert makes it then and starts it; nothing is left",
        .enabled(if: enabled), .timeLimit(.minutes(5)))
    func spareWaitsForQuietHost() async throws {
        let image = try requireImage()
        // Every CPU kept busy at the lowest priority (the tests beside this one hardly notice):
        // this host cannot be quiet while they run.
        // As many as /proc/stat counts, whatever this process's CPU quota.
        let burners = try (0..<max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))).map { _ in
            try ServerProcess(["/usr/bin/nice", "-n", "19", "/bin/sh", "-c", "while :; do :; done"])
        }
        defer {
            for burner in burners { burner.signal(SIGKILL) }
        }
        let server = try ServerProcess([TestPaths.executable("debusine-virt-incus"), "--debug", image])
        #expect(try await server.readLine() == "ok")
        #expect(try await server.request("open").hasPrefix("ok /"), "\(server.standardError)")
        // Four times the quiet moment the spare waits for.
        try await Task.sleep(for: .seconds(4))
        let before = try await instances(ownedBy: server.pid)
        #expect(before.count == 1, "a spare was made while the host was busy: \(before)")
        #expect(try await server.request("revert").hasPrefix("ok /"), "\(server.standardError)")
        let said = await server.standardError(containing: "starting the spare")
        #expect(said.contains("the wait for a quiet host ended early"), "\(said)")
        let after = try await instances(ownedBy: server.pid)
        #expect(after.count == 1 && after != before, "the reverted testbed runs in the spare alone: \(after)")
        for burner in burners {
            burner.signal(SIGKILL)
            _ = try await burner.wait()
        }
        #expect(try await server.request("close") == "ok")
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0), "\(server.standardError)")
        #expect(try await instances(ownedBy: server.pid).isEmpty)
    }

    /// A server opened, with its testbed and the spare for the next revert both made; and the
    /// private directory of its guest helper's relay.
    func openedWithSpare(_ image: String) async throws -> (ServerProcess, [String], String) {
        // At once: the test machine is rarely quiet.
        let server = try ServerProcess([TestPaths.executable("debusine-virt-incus"), "--eager-spare", image])
        #expect(try await server.readLine() == "ok")
        #expect(try await server.request("open").hasPrefix("ok /"))
        // Killed once the spare exists, maybe still being made by incusd: gc waits for that.
        var left = try await instances(ownedBy: server.pid)
        let deadline = ContinuousClock.now + .seconds(60)
        while left.count < 2 && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(100))
            left = try await instances(ownedBy: server.pid)
        }
        #expect(left.count == 2, "the testbed and its spare: \(left)")
        // Made with the testbed, whether or not its helper came up; it names its server.
        let parent = PrivateDirectory.temporaryParent
        let relays = TestPaths.contents(of: parent).filter {
            $0.hasPrefix("dvi.") && OwnedDirectory.owner(of: "\(parent)/\($0)")?.pid == server.pid
        }
        let relay = try #require(relays.first, "no relay directory of \(server.pid) in \(parent)")
        return (server, left, "\(parent)/\(relay)")
    }

    @Test(
        "SIGTERM while open deletes the instance and dies by the signal; after SIGKILL the death watch deletes them, or the next server's start-up sweep when the watch is gone too",
        .enabled(if: enabled), .timeLimit(.minutes(5)))
    func signalsAndGC() async throws {
        let image = try requireImage()
        let terminated = try ServerProcess([TestPaths.executable("debusine-virt-incus"), image])
        #expect(try await terminated.readLine() == "ok")
        #expect(try await terminated.request("open").hasPrefix("ok /"))
        // The testbed (the spare for the next revert waits for a quiet host).
        #expect(try await !instances(ownedBy: terminated.pid).isEmpty)
        terminated.signal(SIGTERM)
        #expect(try await terminated.wait() == .signaled(SIGTERM))
        #expect(try await instances(ownedBy: terminated.pid).isEmpty)

        // SIGKILL: what the server cannot clean up, its death watch does.
        let (watched, watchedLeft, watchedRelay) = try await openedWithSpare(image)
        watched.signal(SIGKILL)
        _ = try await watched.wait()
        let deadline = ContinuousClock.now + .seconds(120)
        while try await !instances(ownedBy: watched.pid).isEmpty && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect(try await instances(ownedBy: watched.pid).isEmpty, "the death watch left \(watchedLeft)")
        #expect(access(watchedRelay, F_OK) != 0, "the death watch left the relay's directory \(watchedRelay)")
        let said = await watched.standardError(containing: "died without cleaning up")
        // Each was deleted by the watch, unless another server's start-up sweep (tests run side
        // by side) came first: then the watch has nothing of it to report.
        let reported = watchedLeft.filter { said.contains("deleted instance \($0)") }
        if reported.count < watchedLeft.count {
            print("deleted by another server's sweep: \(watchedLeft) - \(reported)")
        }

        // The watch killed too (a kill of the whole session): the next server's first open
        // deletes them (or gc, run by hand; or another server's sweep, when tests run side by side).
        let (killed, left, killedRelay) = try await openedWithSpare(image)
        let watch = try await runner.run(Command("pkill", ["-KILL", "-f", "gc --owner \(killed.pid)$"]))
        #expect(watch.status == .exited(0), "no death watch runs for \(killed.pid)")
        killed.signal(SIGKILL)
        _ = try await killed.wait()
        let next = try ServerProcess([TestPaths.executable("debusine-virt-incus"), image])
        #expect(try await next.readLine() == "ok")
        #expect(try await next.request("open").hasPrefix("ok /"), "\(next.standardError)")
        let sweepDeadline = ContinuousClock.now + .seconds(120)
        while try await !instances(ownedBy: killed.pid).isEmpty && ContinuousClock.now < sweepDeadline {
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect(try await instances(ownedBy: killed.pid).isEmpty, "the start-up sweep left \(left)")
        #expect(access(killedRelay, F_OK) != 0, "the start-up sweep left the relay's directory \(killedRelay)")
        #expect(try await next.request("close") == "ok")
        next.write(line: "quit")
        #expect(try await next.wait() == .exited(0))
        #expect(try await instances(ownedBy: next.pid).isEmpty)
        let gc = try await runner.run(Command(TestPaths.executable("debusine-virt-incus"), ["gc"]))
        #expect(gc.status == .exited(0), "\(gc.errorText)")
        #expect(!gc.outputText.contains(left.first ?? "-"), "\(gc.outputText)")
    }

    @Test(
        "eight auxverb commands at once on a busy host lose no output (side by side with plain incus exec, which does)",
        // A guest slot: its busy loops take the CPU of a guest for half a minute. Ahead of the
        // other guest tests: this suite is serialized, and its tests after this one wait too.
        .enabled(if: enabled), .guestSlot(minutes: 10, ahead: true))
    func noOutputLost() async throws {
        let image = try requireImage()
        let server = try ServerProcess([TestPaths.executable("debusine-virt-incus"), image])
        #expect(try await server.readLine() == "ok")
        try #require(try await server.request("open").hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        let name = try await runner.check(Command(argv: aux + ["cat", "/proc/sys/kernel/hostname"]))
        let plain = ["incus", "exec", "--force-noninteractive", name, "--"]
        // Busy: a loop per core and one more, beside the eight clients.
        let burner = "dv-burner-\(getpid())"
        let cores = max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        let burners = (0...cores).map { _ in
            Task {
                try? await SubprocessRunner().run(
                    Command("timeout", ["300", "sh", "-c", "while :; do :; done", burner]))
            }
        }
        func lost(_ prefix: [String]) async throws -> (Int, [String]) {
            try await withThrowingTaskGroup(of: [String].self) { group in
                for worker in 0..<8 {
                    group.addTask {
                        var missed: [String] = []
                        for index in 0..<40 {
                            let token = "token-\(worker)-\(index)"
                            let result = try await SubprocessRunner().run(Command(argv: prefix + ["echo", token]))
                            if result.outputText != token || !result.status.succeeded {
                                missed.append("\(token): \(result.status), `\(result.outputText)`, \(result.errorText)")
                            }
                        }
                        return missed
                    }
                }
                var all: [String] = []
                for try await missed in group { all += missed }
                return (all.count, all)
            }
        }
        let measured: Result<(Int, [String], Int), any Error>
        do {
            let (ours, oursMissed) = try await lost(aux)
            let (theirs, _) = try await lost(plain)
            measured = .success((ours, oursMissed, theirs))
        } catch {
            measured = .failure(error)
        }
        _ = try? await runner.run(Command("pkill", ["-f", burner]))
        for task in burners { _ = await task.value }
        let (ours, oursMissed, theirs) = try measured.get()
        print(
            "output loss, 320 short commands, 8 at once, busy host: debusine-virt-incus \(ours), plain incus exec \(theirs)"
        )
        #expect(ours == 0, "\(oursMissed.prefix(5))")
        #expect(try await server.request("close") == "ok")
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0))
    }

    @Test(
        "--remote addresses image and instance on that remote (a unix-socket remote of the same daemon)",
        .enabled(if: enabled), .timeLimit(.minutes(5)))
    func remote() async throws {
        let image = try requireImage()
        let configuration = try TestPaths.makeTemporaryDirectory("dv-incus-conf.")
        defer { TestPaths.removeTree(configuration) }
        let environment: [String: String?] = ["INCUS_CONF": configuration]
        try await runner.check(
            Command("incus", ["remote", "add", "loop", "unix:///var/lib/incus/unix.socket"], environment: environment))
        let server = try ServerProcess(
            [TestPaths.executable("debusine-virt-incus"), "--remote", "loop", image],
            environment: ["INCUS_CONF": configuration])
        #expect(try await server.readLine() == "ok")
        #expect(try await server.request("open").hasPrefix("ok /"), "\(server.standardError)")
        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        let echo = Command(aux[0], Array(aux.dropFirst()) + ["echo", "hello"], environment: environment)
        let result = try await runner.run(echo)
        #expect(
            result.outputText == "hello",
            "\(result.status), stderr: \(result.errorText); server: \(server.standardError)")
        // The guest helper's exec, like every command of the server's, addresses the remote.
        let name = try await runner.check(Command(argv: aux + ["cat", "/proc/sys/kernel/hostname"]))
        let helper = try await runner.run(
            Command("pgrep", ["-f", "incus exec --force-noninteractive loop:\(name) -- python3 -c "]))
        #expect(helper.status == .exited(0), "no helper exec on loop:\(name)")
        #expect(try await server.request("close") == "ok")
        #expect(try await instances(ownedBy: server.pid).isEmpty)
        server.write(line: "quit")
        #expect(try await server.wait() == .exited(0))
    }

    @Test(
        "shell gives an interactive root shell on the caller's terminal, in the directory asked for",
        .enabled(if: enabled), .timeLimit(.minutes(5)))
    func shell() async throws {
        let image = try requireImage()
        let harness = "\(TestPaths.repositoryRoot)/Tests/Fixtures/with-terminal"
        let server = try ServerProcess([
            harness, "-42 0", "echo in-$(basename \"$PWD\")-$((6*7)) $(id -u); exit\r",
            TestPaths.executable("debusine-virt-incus"), image,
        ])
        #expect(try await server.readLine() == "ok")
        let opened = try await server.request("open")
        try #require(opened.hasPrefix("ok /"), "\(server.standardError)")
        let scratch = String(opened.dropFirst(3))
        #expect(try await server.request("shell \(scratch)") == "ok", "\(server.standardError)")
        #expect(try await server.request("close") == "ok")
        server.write(line: "quit")
        #expect(
            try await server.wait() == .exited(0),
            "the terminal did not show the shell's answer: \(server.standardError)")
        let name = scratch.split(separator: "/").last.map(String.init) ?? scratch
        #expect(server.standardError.contains("in-\(name)-42 0"), "\(server.standardError)")
    }

    @Test("setup is idempotent and --check finds nothing missing afterwards", .enabled(if: enabled))
    func setup() async throws {
        let tool = TestPaths.executable("debusine-virt-incus")
        let first = try await runner.run(Command(tool, ["setup", "--ipv4-address", "none"]))
        #expect(first.status == .exited(0), "\(first.errorText)")
        let second = try await runner.run(Command(tool, ["setup", "--ipv4-address", "none"]))
        #expect(second.outputText == "everything was already set up; nothing changed")
        let check = try await runner.run(Command(tool, ["setup", "--check"]))
        #expect(check.status == .exited(0) && check.outputText == "everything is set up", "\(check.outputText)")
        let profile = try await runner.check(Command("incus", ["profile", "show", "debusine"]))
        for line in [
            "raw.lxc: lxc.mount.auto=sys", "security.secureboot: \"false\"", "name: host0", "network: debusinebr0",
        ] {
            #expect(profile.contains(line), "\(profile)")
        }
        let missing = try await runner.run(Command(tool, ["setup", "--check", "--profile", "debusine-virt-absent"]))
        #expect(missing.status == .exited(1))
        #expect(missing.outputText.contains("missing: profile debusine-virt-absent"))
    }
}

/// `debusine-virt-incus import` with small tarballs made here, against the real incusd.
@Suite("debusine-virt-incus import with a real incusd", .serialized)
struct IncusImportTests {
    let runner = SubprocessRunner()
    let tool = TestPaths.executable("debusine-virt-incus")

    /// A tiny root filesystem as a tarball; `arm64` puts an aarch64 executable header where the
    /// import looks for the architecture, instead of this host's `env`.
    func makeRootfs(_ work: String, withInit: Bool, arm64: Bool = false) async throws -> String {
        let root = "\(work)/root"
        try await runner.check(
            Command(
                "sh",
                [
                    "-ec",
                    #"""
                    mkdir -p "$1/usr/bin" "$1/usr/sbin" "$1/usr/lib/systemd/system" "$1/etc"
                    if [ "$3" = yes ]; then
                        printf '\177ELF\002\001\001\000\000\000\000\000\000\000\000\000\002\000\267\000' > "$1/usr/bin/env"
                        head -c 108 /dev/zero >> "$1/usr/bin/env"
                        chmod 755 "$1/usr/bin/env"
                    else
                        cp /usr/bin/env "$1/usr/bin/env"
                    fi
                    printf 'NAME="Debian GNU/Linux"\nVERSION_CODENAME=testing-x\n' > "$1/usr/lib/os-release"
                    touch "$1/usr/lib/systemd/system/systemd-networkd.service"
                    [ "$2" = no ] || ln -s /lib/systemd/systemd "$1/usr/sbin/init"
                    """#, "sh", root, withInit ? "yes" : "no", arm64 ? "yes" : "no",
                ]))
        let tarball = "\(work)/rootfs.tar.xz"
        try await runner.check(Command("tar", ["--create", "--xz", "--file", tarball, "--directory", root, "."]))
        return tarball
    }

    func aliasExists(_ alias: String) async throws -> Bool {
        try await runner.run(Command("incus", ["image", "info", alias])).status.succeeded
    }

    @Test(
        "import makes a unified image with rootfs/, networkd, the generator, metadata and templates; again is a no-op",
        .enabled(if: IncusServerTests.enabled))
    func importsSmallTarball() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-import.")
        defer { TestPaths.removeTree(work) }
        let tarball = try await makeRootfs(work, withInit: true)
        let id = "test-\(getpid())"
        let alias = "artifact/\(id)"
        defer { _ = try? FileManager.default.removeItem(atPath: work) }
        // A file URL goes through the image cache, with its digest checked.
        let digest = try await runner.check(Command("sha256sum", [tarball])).split(separator: " ").first.map(
            String.init)
        let first = try await runner.run(
            Command(
                tool,
                [
                    "import", "--artifact-id", id, "--cache-dir", "\(work)/cache", "--sha256", digest ?? "",
                    "file://\(tarball)",
                ]
            ))
        #expect(first.status == .exited(0), "\(first.errorText)")
        defer { Task { _ = try? await SubprocessRunner().run(Command("incus", ["image", "delete", alias])) } }
        let info = try await runner.check(Command("incus", ["image", "info", alias]))
        for line in [
            "Architecture: x86_64", "Type: container", "release: testing-x", "artifact_id: \(id)",
            "architecture: amd64",
            "os: Debian",
        ] {
            #expect(info.contains(line), "\(info)")
        }
        let again = try await runner.run(Command(tool, ["import", "--artifact-id", id, tarball]))
        #expect(again.status == .exited(0))
        #expect(again.outputText.contains("already imported"), "\(again.outputText)")

        let export = "\(work)/export"
        try FileManager.default.createDirectory(atPath: export, withIntermediateDirectories: false)
        try await runner.check(Command("incus", ["image", "export", alias, "\(export)/image"]))
        let exported = TestPaths.contents(of: export)
        try #require(exported.count == 1, "a unified image: \(exported)")
        let listing = try await runner.check(
            Command("tar", ["--list", "--verbose", "--file", "\(export)/\(exported[0])"]))
        #expect(listing.contains(" metadata.yaml"))
        #expect(listing.contains(" templates/hostname.tpl"))
        #expect(listing.contains(" templates/hosts.tpl"))
        #expect(listing.contains("rootfs/usr/sbin/init -> /lib/systemd/systemd"))
        #expect(
            listing.contains(
                "rootfs/etc/systemd/system/multi-user.target.wants/systemd-networkd.service -> /usr/lib/systemd/system/systemd-networkd.service"
            ))
        #expect(
            listing.contains("-rwxr-xr-x root/root") && listing.contains("rootfs/etc/systemd/system-generators/lxc"))
        #expect(try await runner.run(Command("incus", ["image", "delete", alias])).status.succeeded)
    }

    @Test(
        "--vm imports a qcow2 image, or a tarball holding one raw image converted to qcow2, as a VM image",
        .enabled(if: IncusServerTests.enabled))
    func importsVirtualMachineImages() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-import.")
        defer { TestPaths.removeTree(work) }
        try await runner.check(Command("truncate", ["--size=16M", "\(work)/disk.raw"]))
        try await runner.check(
            Command("tar", ["--create", "--file", "\(work)/disk.tar", "--directory", work, "disk.raw"]))
        try await runner.check(
            Command("qemu-img", ["convert", "-O", "qcow2", "\(work)/disk.raw", "\(work)/disk.qcow2"]))
        for (index, file) in ["disk.qcow2", "disk.tar"].enumerated() {
            let alias = "artifact/vm-\(getpid())-\(index)"
            let result = try await runner.run(
                Command(tool, ["import", "--artifact-id", "vm-\(getpid())-\(index)", "--vm", "\(work)/\(file)"]))
            #expect(result.status == .exited(0), "\(file): \(result.errorText)")
            let info = try await runner.run(Command("incus", ["image", "info", alias]))
            #expect(info.outputText.contains("Type: virtual-machine"), "\(file): \(info.outputText)")
            #expect(info.outputText.contains("Architecture: x86_64"))
            _ = try await runner.run(Command("incus", ["image", "delete", alias]))
        }
        let two = "\(work)/two.tar"
        try await runner.check(Command("cp", ["\(work)/disk.raw", "\(work)/other.raw"]))
        try await runner.check(
            Command("tar", ["--create", "--file", two, "--directory", work, "disk.raw", "other.raw"]))
        let refused = try await runner.run(
            Command(tool, ["import", "--artifact-id", "vm-two-\(getpid())", "--vm", two]))
        #expect(refused.status != .exited(0))
        #expect(refused.errorText.contains("exactly one raw image"), "\(refused.errorText)")
        #expect(try await !aliasExists("artifact/vm-two-\(getpid())"))
    }

    @Test(
        "an arm64 tarball imports as aarch64; on this host the server refuses it before the banner, naming both",
        .enabled(if: IncusServerTests.enabled && Host.machine == "x86_64"))
    func foreignArchitecture() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-import.")
        defer { TestPaths.removeTree(work) }
        let tarball = try await makeRootfs(work, withInit: true, arm64: true)
        let id = "arm64-\(getpid())"
        let alias = "artifact/\(id)"
        let imported = try await runner.run(Command(tool, ["import", "--artifact-id", id, tarball]))
        #expect(imported.status == .exited(0), "\(imported.errorText)")
        let info = try await runner.run(Command("incus", ["image", "info", alias]))
        #expect(
            info.outputText.contains("Architecture: aarch64") && info.outputText.contains("architecture: arm64"),
            "\(info.outputText)")
        let server = try ServerProcess([tool, alias])
        let ended = try await server.wait(timeout: .seconds(60))
        let banner = try await server.readLine()
        _ = try await runner.run(Command("incus", ["image", "delete", alias]))
        #expect(ended == .exited(69), "\(server.standardError)")
        #expect(banner == nil, "no banner")
        #expect(
            server.standardError.contains(
                "the image \(alias) is for arm64 (aarch64), which the Incus server cannot run: it runs amd64 (x86_64)"),
            "\(server.standardError)")
    }

    @Test(
        "a tarball without init, a corrupt one and a missing file fail clearly and leave no alias",
        .enabled(if: IncusServerTests.enabled))
    func refusesBadTarballs() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-import.")
        defer { TestPaths.removeTree(work) }
        let noInit = try await makeRootfs(work, withInit: false)
        let id = "bad-\(getpid())"
        let refused = try await runner.run(Command(tool, ["import", "--artifact-id", id, noInit]))
        #expect(refused.status == .exited(1))
        #expect(refused.errorText.contains("no /sbin/init or /usr/sbin/init"), "\(refused.errorText)")
        #expect(try await !aliasExists("artifact/\(id)"))

        let corrupt = "\(work)/corrupt.tar.xz"
        try await runner.check(Command("sh", ["-c", #"head -c 3000 "$1" > "$2""#, "sh", noInit, corrupt]))
        let broken = try await runner.run(Command(tool, ["import", "--artifact-id", id, corrupt]))
        #expect(broken.status == .exited(1))
        #expect(broken.errorText.contains("corrupt"), "\(broken.errorText)")
        #expect(try await !aliasExists("artifact/\(id)"))

        // Through the image cache: a file URL whose digest does not match is not imported.
        let cache = "\(work)/cache"
        let wrong = try await runner.run(
            Command(
                tool,
                [
                    "import", "--artifact-id", id, "--cache-dir", cache, "--sha256", String(repeating: "0", count: 64),
                    "file://\(noInit)",
                ]))
        #expect(wrong.status == .exited(1))
        #expect(wrong.errorText.contains("checksum mismatch"), "\(wrong.errorText)")
        #expect(try await !aliasExists("artifact/\(id)"))

        let missing = try await runner.run(Command(tool, ["import", "--artifact-id", id, "\(work)/absent.tar.xz"]))
        #expect(missing.status == .exited(1))
        #expect(missing.errorText.contains("does not exist"), "\(missing.errorText)")
        #expect(TestPaths.contents(of: PrivateDirectory.temporaryParent).filter { $0.hasPrefix("dvi-import.") }.isEmpty)
    }
}
