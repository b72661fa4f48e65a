import CommandRunner
import Testing
import VirtCore

@Suite("Running external commands")
struct CommandRunnerTests {
    let runner = SubprocessRunner()

    @Test("a command is its argv; the display form quotes what a shell would split")
    func argv() {
        let command = Command("incus", ["exec", "name with space", "--", "sh", "-c", "it's"])
        #expect(command.argv == ["incus", "exec", "name with space", "--", "sh", "-c", "it's"])
        #expect(command.description == #"incus exec 'name with space' -- sh -c 'it'\''s'"#)
        #expect(Command(argv: ["a", "b"]).argv == ["a", "b"])
    }

    @Test("stdout and stderr are captured, stdin bytes are fed, hostile arguments pass untouched")
    func captures() async throws {
        let hostile = "$(touch /tmp/pwned); `id` ; 'quote\" \\ \n"
        let result = try await runner.run(
            Command("sh", ["-c", #"cat; printf '%s' "$1"; echo err >&2"#, "sh", hostile]),
            input: .bytes(Array("in:".utf8)))
        #expect(result.status == .exited(0))
        #expect(String(decoding: result.standardOutput, as: UTF8.self) == "in:" + hostile)
        #expect(result.errorText == "err")
    }

    @Test("a command that exits without reading its stdin bytes does not crash us")
    func unreadInputBytes() async throws {
        // swift-subprocess 1.0.2's own array input traps in this case; ours must not.
        for _ in 0..<3 {
            let result = try await runner.run(Command("true"), input: .bytes([UInt8](repeating: 7, count: 4 << 20)))
            #expect(result.status == .exited(0))
        }
    }

    @Test("exit statuses and signal deaths are reported as they happened")
    func statuses() async throws {
        #expect(try await runner.run(Command("sh", ["-c", "exit 3"])).status == .exited(3))
        #expect(try await runner.run(Command("sh", ["-c", "exit 255"])).status == .exited(255))
        #expect(try await runner.run(Command("sh", ["-c", "kill -9 $$"])).status == .signaled(9))
    }

    @Test("check() returns stdout and turns failure into an error quoting the command and its stderr")
    func check() async throws {
        #expect(try await runner.check(Command("printf", ["a\\n"])) == "a")
        await #expect(throws: VirtError.self) {
            try await runner.check(Command("sh", ["-c", "echo boom >&2; exit 1"]))
        }
        do {
            try await runner.check(Command("sh", ["-c", "echo boom >&2; exit 1"]))
        } catch {
            #expect(error.code == .commandFailed)
            #expect(error.message.contains("boom"))
            #expect(error.message.contains("exit status 1"))
        }
    }

    @Test("a missing program is a clear error, not a crash")
    func missingProgram() async {
        do {
            _ = try await runner.run(Command("/nonexistent/program"))
            Issue.record("expected an error")
        } catch {
            #expect(error.code == .commandFailed)
            #expect(error.message.contains("/nonexistent/program"))
        }
    }

    @Test("environment changes apply to the child only")
    func environment() async throws {
        let output = try await runner.check(
            Command("sh", ["-c", "echo \"$DV_SET/${HOME:-unset}\""], environment: ["DV_SET": "yes", "HOME": nil]))
        #expect(output == "yes/unset")
    }

    @Test("a timeout stops the command: the race throws a timeout error and the process is gone")
    func timeoutStopsTheCommand() async throws {
        let marker = "/tmp/dv-runner-\(getpid())"
        defer { unlink(marker) }
        let clock = ContinuousClock()
        let start = clock.now
        do {
            _ = try await withTimeout(.milliseconds(300), "sleeping") { [runner] in
                try await runner.run(Command("sh", ["-c", "echo $$ > \(marker); exec sleep 600"]))
            }
            Issue.record("expected a timeout")
        } catch {
            #expect(error.code == .timeout)
        }
        // The command sleeps 600 s; ending well before proves the race stopped it, with room for
        // a machine starved at the start of a test run (36 s once, with a 30 s sleep).
        #expect(clock.now - start < .seconds(300))
        let text = try await runner.check(Command("cat", [marker]))
        let pid = try #require(pid_t(text))
        #expect(kill(pid, 0) != 0, "the timed-out command is still running")
    }

    @Test("durations read as seconds in messages, negative ones too")
    func formattedSeconds() {
        #expect(Duration.seconds(2).formattedSeconds == "2 s")
        #expect(Duration.milliseconds(1500).formattedSeconds == "1.5 s")
        #expect(Duration.milliseconds(-3900).formattedSeconds == "-3.9 s")
    }

    @Test("output can go to a file descriptor, streamed, never held in memory")
    func outputToDescriptor() async throws {
        let path = "/tmp/dv-runner-out-\(getpid())"
        defer { unlink(path) }
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(fd >= 0)
        let result = try await runner.run(
            Command("head", ["-c", "10000000", "/dev/zero"]), input: .none,
            output: .fileDescriptor(fd, closeAfterStart: true), error: .capture)
        #expect(result.status == .exited(0))
        #expect(result.standardOutput.isEmpty)
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_size == 10_000_000)
    }

    @Test("executables are found on PATH, or as a path that is executable; nothing else is")
    func executables() async throws {
        let sh = try #require(await Executables.find("sh"))
        #expect(sh.hasSuffix("/sh") && access(sh, X_OK) == 0)
        #expect(await Executables.find("/bin/sh") == "/bin/sh")
        #expect(await !Executables.exist("debusine-virt-no-such-program"))
        let plain = "/tmp/dv-not-executable-\(getpid())"
        defer { unlink(plain) }
        let fd = open(plain, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        try #require(fd >= 0)
        close(fd)
        #expect(await !Executables.exist(plain), "a file that is not executable")
        #expect(await !Executables.exist("/nonexistent/sh"))
    }
}
