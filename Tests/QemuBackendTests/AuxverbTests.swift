import CommandRunner
import Foundation
import GuestChannel
import GuestHelper
import QemuBackend
import TestbedCore
import Testing
import VirtCore
import VirtTestSupport

/// The auxverb path end to end without a VM: the real guest helper (Python) runs on the host in
/// `--listen` mode where QEMU's port would be, the real relay serves the real client executable.
/// Everything the commands do here happens on the host, so they are harmless ones.
final class HostHelper: Sendable {
    let directory: String
    let helper: ServerProcess
    let relay: AuxverbRelay
    let relayTask: Task<Void, Never>

    var auxverb: [String] { [TestPaths.executable("debusine-virt-auxverb"), relay.socketPath] }

    /// Starts the real helper in `--listen` mode on `directory`/port.sock, announcing `version`,
    /// and waits for the socket's file (it appears at bind(), before listen()).
    static func listening(
        in directory: String, version: String = GuestHelperScript.version
    ) async throws -> (helper: ServerProcess, port: String) {
        let script = "\(directory)/helper.py"
        let port = "\(directory)/port.sock"
        try Data(GuestHelperScript.source.utf8).write(to: URL(fileURLWithPath: script))
        let helper = try ServerProcess(["/usr/bin/python3", script, "--version", version, "--listen", port])
        _ = await Deadline(after: .seconds(60)).poll(every: .milliseconds(10)) { access(port, F_OK) == 0 }
        return (helper, port)
    }

    /// A temporary directory (the first argument of `body`) with the real helper listening on
    /// its port (the second) in it, both gone once `body` returns.
    static func withListening(
        version: String = GuestHelperScript.version, _ body: (String, String) async throws -> Void
    ) async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-aux.")
        defer { TestPaths.removeTree(directory) }
        let (helper, port) = try await listening(in: directory, version: version)
        defer { helper.signal(SIGKILL) }
        try await body(directory, port)
    }

    init() async throws {
        directory = try TestPaths.makeTemporaryDirectory("dv-aux.")
        let port: String
        (helper, port) = try await Self.listening(in: directory)
        let relay = AuxverbRelay(socketPath: "\(directory)/aux.sock")
        self.relay = relay
        relayTask = Task { try? await relay.run(guestPortPath: port) }
        do {
            _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(30))
        } catch {
            // No instance will exist to stop: stop what was started here.
            await stop()
            throw error
        }
    }

    /// Runs a command through the auxverb and captures everything.
    func run(_ argv: [String], input: CommandInput = .none) async throws -> CommandResult {
        try await SubprocessRunner().run(
            Command(argv: auxverb + argv), input: input, output: .capture(limit: 64 << 20),
            error: .capture(limit: 64 << 20))
    }

    func stop() async {
        relayTask.cancel()
        helper.signal(SIGTERM)
        _ = try? await helper.wait(timeout: .seconds(60))
        // The relay removes its socket as it ends: removing the directory under it would race.
        await relayTask.value
        TestPaths.removeTree(directory)
    }
}

@Suite("Auxverb through relay and guest helper", .serialized)
struct AuxverbTests {
    func withHelper(_ body: (HostHelper) async throws -> Void) async throws {
        let host = try await HostHelper()
        do {
            try await body(host)
        } catch {
            await host.stop()
            throw error
        }
        await host.stop()
    }

    @Test(
        "exit statuses follow the auxverb contract: 255 becomes 253, signal N becomes 128+N",
        arguments: [
            ("exit 0", 0), ("exit 3", 3), ("exit 125", 125), ("exit 254", 254), ("exit 255", 253),
            ("kill -9 $$", 137), ("kill -TERM $$", 143), ("kill -INT $$", 130),
        ] as [(String, Int32)])
    func exitStatuses(_ script: String, _ expected: Int32) async throws {
        try await withHelper { host in
            let result = try await host.run(["sh", "-c", script])
            #expect(result.status == .exited(expected))
        }
    }

    @Test("argv passes through untouched: spaces, quotes, newlines, UTF-8, empty words, shell syntax")
    func argvIsFaithful() async throws {
        try await withHelper { host in
            let words = ["a b", "", "'\"", "line\nbreak", "ü€✓", "$(id) `id` ; | &", "%2C,", "--", "-n"]
            let result = try await host.run(["printf", "[%s]"] + words)
            #expect(result.status == .exited(0))
            #expect(String(decoding: result.standardOutput, as: UTF8.self) == words.map { "[\($0)]" }.joined())
        }
    }

    @Test("stdout and stderr stay apart; a missing program exits 127 with a message")
    func streamsAndMissingProgram() async throws {
        try await withHelper { host in
            let result = try await host.run(["sh", "-c", "echo out; echo err >&2; exit 4"])
            #expect(result.status == .exited(4))
            #expect(result.outputText == "out")
            #expect(result.errorText == "err")
            let missing = try await host.run(["/nonexistent/program", "x"])
            #expect(missing.status == .exited(127))
            #expect(missing.errorText.contains("cannot run /nonexistent/program"))
        }
    }

    @Test("an argv of 1.5 MiB (more than one frame's payload, less than Linux's limit) runs whole")
    func largeArgv() async throws {
        try await withHelper { host in
            // A word may be up to 128 KiB on Linux (MAX_ARG_STRLEN): twelve of 130,000 bytes.
            let words = (0..<12).map {
                String(repeating: Character(String(UnicodeScalar(UInt8(97 + $0)))), count: 130_000)
            }
            let result = try await host.run(["sh", "-c", #"echo $#; printf %s "$@" | md5sum"#, "sh"] + words)
            #expect(result.status == .exited(0))
            let digest = try await SubprocessRunner().run(
                Command("md5sum", []), input: .bytes(Array(words.joined().utf8)), output: .capture, error: .discard)
            #expect(result.outputText == "12\n\(digest.outputText)")
        }
    }

    @Test("64 MiB stream in through stdin and out through stdout, byte for byte")
    func streaming() async throws {
        try await withHelper { host in
            let source = "\(host.directory)/source"
            let copied = "\(host.directory)/copied"
            let back = "\(host.directory)/back"
            try await SubprocessRunner().check(
                Command("sh", ["-c", #"head -c 67108864 /dev/urandom > "$1""#, "sh", source]))
            let input = open(source, O_RDONLY)
            try #require(input >= 0)
            let up = try await host.run(
                ["sh", "-c", #"cat > "$1""#, "sh", copied], input: .fileDescriptor(input, closeAfterStart: true))
            #expect(up.status == .exited(0))
            let output = open(back, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            try #require(output >= 0)
            let down = try await SubprocessRunner().run(
                Command(argv: host.auxverb + ["cat", copied]), input: .none,
                output: .fileDescriptor(output, closeAfterStart: true), error: .capture)
            #expect(down.status == .exited(0))
            #expect(try await SubprocessRunner().run(Command("cmp", [source, back])).status == .exited(0))
        }
    }

    @Test("four commands run at once and each gets its own output")
    func concurrency() async throws {
        try await withHelper { host in
            let clock = ContinuousClock()
            let start = clock.now
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<4 {
                    group.addTask {
                        let result = try await host.run([
                            "sh", "-c", #"sleep 8; seq 1 20000 | sed "s/^/$1 /""#, "sh", "\(index)",
                        ])
                        #expect(result.status == .exited(0))
                        let lines = result.outputText.split(separator: "\n")
                        #expect(lines.count == 20000)
                        #expect(lines.allSatisfy { $0.hasPrefix("\(index) ") })
                    }
                }
                try await group.waitForAll()
            }
            // One after the other they would take 32 s; the rest is room for a loaded machine.
            #expect(clock.now - start < .seconds(30), "the four commands did not run concurrently")
        }
    }

    @Test(
        "three commands writing megabytes to stdout and stderr at once: every stream whole and in order, none mixed with another"
    )
    func interleavedBulkOutput() async throws {
        try await withHelper { host in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<3 {
                    group.addTask {
                        // Both streams at once, so the helper's frames for one command alternate
                        // between them and between the commands.
                        let result = try await host.run([
                            "sh", "-c", #"seq -f "$1 %g" 1 300000 & seq -f "$1 e%g" 1 300000 >&2; wait"#, "sh",
                            "\(index)",
                        ])
                        #expect(result.status == .exited(0))
                        let expected = (1...300_000).map { "\(index) \($0)" }
                        let errors = (1...300_000).map { "\(index) e\($0)" }
                        #expect(result.outputText.split(separator: "\n").map(String.init) == expected)
                        #expect(result.errorText.split(separator: "\n").map(String.init) == errors)
                    }
                }
                try await group.waitForAll()
            }
        }
    }

    @Test("stderr alone, four times the credit window, comes whole: its frames are credited as stdout's are")
    func stderrBeyondWindow() async throws {
        try await withHelper { host in
            let size = 4 * Frame.window
            let result = try await host.run(["sh", "-c", "head -c \(size) /dev/zero >&2; echo done"])
            #expect(result.status == .exited(0))
            #expect(result.outputText == "done")
            #expect(result.standardError.count == size)
        }
    }

    @Test(
        "our reader gone: the command's stdout closes as a pipe's would (SIGPIPE, or EPIPE where it ignores that), and nothing else in its group is signalled"
    )
    func readerGone() async throws {
        try await withHelper { host in
            let marker = "\(host.directory)/survived"
            let result = try await SubprocessRunner().run(
                Command(
                    "bash",
                    [
                        "-c",
                        #"""
                        marker=$1
                        shift
                        timeout -s KILL 30 "$@" sh -c 'exec yes' | head -c 10 >/dev/null
                        a=${PIPESTATUS[0]}
                        timeout -s KILL 30 "$@" sh -c "trap '' PIPE; exec yes" | head -c 10 >/dev/null
                        b=${PIPESTATUS[0]}
                        timeout -s KILL 30 "$@" sh -c '(sleep 2; touch "$1") & exec yes' sh "$marker" | head -c 10 >/dev/null
                        c=${PIPESTATUS[0]}
                        # Gone only after the command closed its stdout: nothing to tell it.
                        timeout -s KILL 30 "$@" sh -c 'head -c 1000000 /dev/zero; exec >&-; sleep 2; touch "$1.2"' \
                            sh "$marker" | { sleep 1; head -c 1 >/dev/null; }
                        echo "$a $b $c ${PIPESTATUS[0]}"
                        """#,
                        "bash", marker,
                    ] + host.auxverb), input: .none, output: .capture, error: .capture)
            #expect(result.outputText == "141 1 141 0", "\(result.errorText)")
            #expect(result.errorText.contains("Broken pipe"), "yes saw EPIPE: \(result.errorText)")
            let survived = await Deadline(after: .seconds(30)).poll(every: .milliseconds(50)) {
                access(marker, F_OK) == 0
            }
            #expect(survived, "a process of the group that does not write to stdout lives on")
            #expect(access("\(marker).2", F_OK) == 0, "a command whose stdout had ended is left alone")
        }
    }

    @Test("a background process left holding stdout does not hang the call")
    func leakedBackgroundProcess() async throws {
        try await withHelper { host in
            let clock = ContinuousClock()
            let start = clock.now
            let result = try await host.run(["sh", "-c", "sleep 60 & echo started"])
            #expect(result.status == .exited(0))
            #expect(result.outputText == "started")
            #expect(clock.now - start < .seconds(30))
        }
    }

    @Test("a command's own output is delivered whole even when the port is busy for long after it exited")
    func ownOutputOutlivesTheLinger() async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-aux.")
        defer { TestPaths.removeTree(directory) }
        let (helper, port) = try await HostHelper.listening(in: directory)
        defer { helper.signal(SIGKILL) }
        // The socket's file appears at bind(), before listen(): until then a connect is refused.
        let deadline = ContinuousClock.now + .seconds(60)
        var connected: Int32?
        while connected == nil {
            do {
                connected = try RawPort.connect(port)
            } catch {
                guard ContinuousClock.now < deadline else { throw error }
                try await Task.sleep(for: .milliseconds(10))
            }
        }
        let fd = try #require(connected)
        defer { close(fd) }
        // Nothing reads the port for a second: the first command's output fills the helper's
        // queue, so the second command's short output waits there long past the linger.
        #expect(
            RawPort.send(
                fd, Frame(channel: 1, .spawn, Frame.spawn(argv: ["head", "-c", "8388608", "/dev/zero"]).payload)))
        try await Task.sleep(for: .milliseconds(300))
        #expect(RawPort.send(fd, Frame(channel: 2, .spawn, Frame.spawn(argv: ["printf", "data"]).payload)))
        try await Task.sleep(for: .seconds(1))
        var output: [UInt8] = []
        var decoder = FrameDecoder()
        var end: [UInt8]?
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while end == nil {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard count > 0 else { break }
            decoder.append(buffer[0..<count])
            while let frame = try decoder.next() {
                guard frame.channel == 2 else { continue }
                if frame.kind == .stdout { output += frame.payload }
                if frame.kind == .exit { end = frame.payload }
            }
        }
        #expect(end.map { String(decoding: $0, as: UTF8.self) } == "code 0")
        #expect(String(decoding: output, as: UTF8.self) == "data")
    }

    @Test("a command that ignores its stdin does not block on a large input")
    func unreadStdin() async throws {
        try await withHelper { host in
            let result = try await host.run(["true"], input: .bytes([UInt8](repeating: 1, count: 12 << 20)))
            #expect(result.status == .exited(0))
        }
    }

    @Test("SIGTERM to the auxverb stops the remote command")
    func sigtermStopsCommand() async throws {
        try await withHelper { host in
            let pidFile = "\(host.directory)/remote.pid"
            let client = try ServerProcess(
                host.auxverb + ["sh", "-c", #"echo $$ > "$1"; exec sleep 60"#, "sh", pidFile])
            var remote: pid_t?
            let deadline = ContinuousClock.now + .seconds(60)
            while remote == nil && ContinuousClock.now < deadline {
                remote = (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap {
                    pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines))
                }
                try await Task.sleep(for: .milliseconds(20))
            }
            let pid = try #require(remote)
            client.signal(SIGTERM)
            #expect(try await client.wait(timeout: .seconds(60)) == .exited(143))
            try await Task.sleep(for: .milliseconds(200))
            #expect(kill(pid, 0) != 0, "the remote command survived")
        }
    }

    @Test("when the helper is gone the auxverb fails with 255 and says why")
    func helperGone() async throws {
        try await withHelper { host in
            host.helper.signal(SIGKILL)
            _ = try await host.helper.wait()
            try await Task.sleep(for: .milliseconds(200))
            let result = try await host.run(["true"])
            #expect(result.status == .exited(255))
            #expect(result.errorText.contains("not ready") || result.errorText.contains("gone"))
        }
    }

    @Test("--terminal runs the command on a pseudo-terminal of the given size, output and status intact")
    func terminal() async throws {
        try await withHelper { host in
            let result = try await SubprocessRunner().run(
                Command(
                    argv: [
                        TestPaths.executable("debusine-virt-auxverb"), "--terminal", "30x100", host.relay.socketPath,
                    ]
                        + ["sh", "-c", "tty; stty size; test -t 0 && echo stdin-is-a-tty; exit 7"]),
                input: .none, output: .capture, error: .capture)
            #expect(result.status == .exited(7))
            // A terminal ends lines with CR LF, which Swift counts as one character.
            let lines = result.outputText.split(whereSeparator: { $0 == "\n" || $0 == "\r\n" }).map(String.init)
            #expect(lines.first?.hasPrefix("/dev/pts/") == true, "\(lines)")
            #expect(lines.contains("30 100"), "\(lines)")
            #expect(lines.contains("stdin-is-a-tty"), "\(lines)")
            // Pipes as before without it.
            let plain = try await host.run(["sh", "-c", "test -t 0 || echo not-a-tty"])
            #expect(plain.outputText == "not-a-tty")
        }
    }

    func readFile(_ host: HostHelper, _ path: String) async throws -> CommandResult {
        try await SubprocessRunner().run(
            Command(TestPaths.executable("debusine-virt-auxverb"), ["--read-file", host.relay.socketPath, path]),
            input: .none, output: .capture(limit: 64 << 20), error: .capture)
    }

    @Test("what the helper leaves to `cat` runs the host's own copy script, statuses and all")
    func sameCopyScript() {
        #expect(GuestHelperScript.source.contains("\nSEND_FILE_SCRIPT = '\(CopyPlumbing.sendFileScript)'\n"))
    }

    @Test("--read-file sends a file whole, with status 3 when root may execute it and 0 when not")
    func readFileWhole() async throws {
        try await withHelper { host in
            let path = "\(host.directory)/data"
            var generator = SystemRandomNumberGenerator()
            let bytes = Data((0..<(9 << 20) + 123).map { _ in UInt8.random(in: 0...255, using: &generator) })
            try bytes.write(to: URL(fileURLWithPath: path))
            let plain = try await readFile(host, path)
            #expect(plain.status == .exited(0))
            #expect(plain.standardOutput == Array(bytes), "\(plain.standardOutput.count) bytes")
            #expect(plain.errorText == "")
            chmod(path, 0o744)
            let executable = try await readFile(host, path)
            #expect(executable.status == .exited(3))
            #expect(executable.standardOutput == Array(bytes))
            let empty = "\(host.directory)/empty"
            try Data().write(to: URL(fileURLWithPath: empty))
            let nothing = try await readFile(host, empty)
            #expect(nothing.status == .exited(0))
            #expect(nothing.standardOutput.isEmpty)
        }
    }

    @Test("--read-file of a missing file or of a directory ends with 1 and says why")
    func readFileFailures() async throws {
        try await withHelper { host in
            let missing = try await readFile(host, "\(host.directory)/missing")
            #expect(missing.status == .exited(1))
            #expect(missing.standardOutput.isEmpty)
            #expect(missing.errorText.contains("cannot read \(host.directory)/missing: No such file or directory"))
            let directory = try await readFile(host, host.directory)
            #expect(directory.status == .exited(1))
            #expect(directory.errorText.contains("Is a directory"), "\(directory.errorText)")
            // The helper serves on.
            #expect(try await host.run(["true"]).status == .exited(0))
        }
    }

    @Test(
        "--read-file takes a relative path from /, and leaves to cat what is not a regular file on a local file system: /proc's, a FIFO, /dev/null, errors included"
    )
    func readFileOthers() async throws {
        try await withHelper { host in
            let relative = try await readFile(host, "etc/passwd")
            #expect(relative.status == .exited(0))
            #expect(relative.standardOutput == Array(try Data(contentsOf: URL(fileURLWithPath: "/etc/passwd"))))
            // /proc/self is the process that reads it: cat, not the helper.
            let proc = try await readFile(host, "/proc/self/status")
            #expect(proc.status == .exited(0))
            #expect(proc.outputText.hasPrefix("Name:\tcat\n"), "\(proc.outputText)")
            // A read that fails (EIO at offset 0) fails the copy with cat's status and message.
            let memory = try await readFile(host, "/proc/self/mem")
            #expect(memory.status == .exited(1))
            #expect(memory.errorText.contains("Input/output error"), "\(memory.errorText)")
            let null = try await readFile(host, "/dev/null")
            #expect(null.status == .exited(0))
            #expect(null.standardOutput.isEmpty)
            // Executable, so that `cat`'s path must keep status 3 too.
            let fifo = "\(host.directory)/fifo"
            #expect(mkfifo(fifo, 0o700) == 0)
            let writer = try ServerProcess(["/bin/sh", "-c", #"printf 'through the fifo' > "$1""#, "sh", fifo])
            let throughFIFO = try await readFile(host, fifo)
            #expect(throughFIFO.status == .exited(3))
            #expect(throughFIFO.outputText == "through the fifo")
            #expect(try await writer.wait(timeout: .seconds(60)) == .exited(0))
        }
    }

    @Test("--read-file whose reader goes away stops there, as cat would (141), and the helper serves on")
    func readFileReaderGone() async throws {
        try await withHelper { host in
            let path = "\(host.directory)/big"
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            #expect(ftruncate(fd, 1 << 30) == 0)
            close(fd)
            let result = try await SubprocessRunner().run(
                Command(
                    "/bin/bash",
                    [
                        "-c", #""$@" | head -c 10 > /dev/null; echo "${PIPESTATUS[0]}""#, "bash",
                        TestPaths.executable("debusine-virt-auxverb"), "--read-file", host.relay.socketPath, path,
                    ]))
            #expect(result.outputText == "141", "\(result.errorText)")
            #expect(try await host.run(["echo", "still"]).outputText == "still")
        }
    }

    @Test("the helper reads a file itself only on a local file system: /tmp's and /dev/shm's, not /proc's or /sys's")
    func localFileSystems() async throws {
        let script = try TestPaths.makeTemporaryDirectory("dv-aux.")
        defer { TestPaths.removeTree(script) }
        try Data(GuestHelperScript.source.utf8).write(to: URL(fileURLWithPath: "\(script)/helper.py"))
        let result = try await SubprocessRunner().run(
            Command(
                "/usr/bin/python3",
                [
                    "-c",
                    """
                    import os, runpy, sys
                    local = runpy.run_path(sys.argv[1], run_name='helper')['local_file_system']
                    print(' '.join(str(local(os.open(p, os.O_PATH))) for p in sys.argv[2:]))
                    """,
                    "\(script)/helper.py", script, "/dev/shm", "/proc/self/status", "/sys/class",
                ]))
        #expect(result.status == .exited(0), "\(result.errorText)")
        #expect(result.outputText == "True True False False")
    }

    @Test("a malformed --read-file is an auxverb failure (255) with a usage message")
    func badReadFile() async throws {
        let result = try await SubprocessRunner().run(
            Command(TestPaths.executable("debusine-virt-auxverb"), ["--read-file", "/nonexistent.sock"]))
        #expect(result.status == .exited(255))
        #expect(result.errorText.contains("usage"))
    }

    @Test("a malformed --terminal is an auxverb failure (255) with a usage message")
    func badTerminal() async throws {
        let result = try await SubprocessRunner().run(
            Command(TestPaths.executable("debusine-virt-auxverb"), ["--terminal", "big", "/nonexistent.sock", "true"]))
        #expect(result.status == .exited(255))
        #expect(result.errorText.contains("usage"))
    }
}

/// A guest end written by an attacker (a root test can stop the helper and take its port): it
/// says hello like the helper, then breaks the channel's bounds. The real relay and client face it.
@Suite("A guest end that breaks the channel's bounds", .serialized, .timeLimit(.minutes(5)))
struct HostileGuestEndTests {
    static let fake = """
        import os, socket, struct, sys
        path, mode, report = sys.argv[1:4]
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        conn, _ = server.accept()
        header = struct.Struct('>IBI')
        def send(channel, kind, payload):
            conn.sendall(header.pack(channel, kind, len(payload)) + payload)
        send(0, 0x16, b'hostile-boot 1')
        buffered, channel = b'', None
        while channel is None:
            data = conn.recv(1 << 20)
            if not data:
                sys.exit(1)
            buffered += data
            while len(buffered) >= 9:
                frame_channel, kind, length = header.unpack_from(buffered)
                if len(buffered) < 9 + length:
                    break
                if kind == 1:
                    channel = frame_channel
                buffered = buffered[9 + length:]
        outcome = 'open'
        conn.settimeout(60)
        try:
            if mode == 'output':
                sent = 0
                while sent < (64 << 20):
                    send(channel, 0x11, b'x' * (1 << 20))
                    sent += 1 << 20
                outcome = 'sent all %d' % sent
            elif mode == 'exit-then-garbage':
                # One write: output, the exit, then a frame of no known kind.
                conn.sendall(header.pack(channel, 0x11, 6) + b'hello\\n' + header.pack(channel, 0x13, 6)
                             + b'code 3' + header.pack(channel, 0x7f, 0))
            else:
                send(channel, 0x14, struct.pack('>I', 1000))
            while conn.recv(1 << 20):
                pass
            outcome = 'closed' if outcome == 'open' else outcome
        except OSError:
            outcome = 'closed' if outcome == 'open' else outcome
        with open(report + '.tmp', 'w') as f:
            f.write(outcome)
        os.rename(report + '.tmp', report)
        """

    /// Runs `body` against a relay serving the fake guest end in `mode` (a fake that says it
    /// is version 1); `outcome` waits for the fake's report of how its port ended. Stops both.
    func withFakeGuestEnd(
        _ mode: String, _ body: (_ relay: AuxverbRelay, _ outcome: () async throws -> String) async throws -> Void
    ) async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-hostile.")
        defer { TestPaths.removeTree(directory) }
        let script = "\(directory)/fake.py"
        try Data(Self.fake.utf8).write(to: URL(fileURLWithPath: script))
        let port = "\(directory)/port.sock"
        let report = "\(directory)/report"
        let guestEnd = try ServerProcess(["/usr/bin/python3", script, port, mode, report])
        let deadline = ContinuousClock.now + .seconds(60)
        while access(port, F_OK) != 0 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        let relay = AuxverbRelay(socketPath: "\(directory)/aux.sock", expectedVersion: "1")
        let relayTask = Task { try? await relay.run(guestPortPath: port) }
        var failure: (any Error)?
        do {
            _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(30))
            try await body(relay) {
                while access(report, F_OK) != 0 && ContinuousClock.now < deadline + .seconds(60) {
                    try await Task.sleep(for: .milliseconds(50))
                }
                return String(decoding: FileManager.default.contents(atPath: report) ?? Data(), as: UTF8.self)
            }
        } catch {
            failure = error
        }
        relayTask.cancel()
        await relayTask.value
        guestEnd.signal(SIGKILL)
        _ = try? await guestEnd.wait(timeout: .seconds(10))
        if let failure { throw failure }
    }

    @Test(
        "output past the credit window, or stdin acknowledged that was never sent, closes the guest's port with a clear error",
        arguments: ["output", "stdin-credit"])
    func dropsTheGuestEnd(_ mode: String) async throws {
        try await withFakeGuestEnd(mode) { relay, outcome in
            // Nobody reads the client's stdout yet: whatever the guest sends piles up in the relay.
            var ends: [Int32] = [-1, -1]
            try #require(pipe(&ends) == 0)
            let (writeEnd, socket) = (ends[1], relay.socketPath)
            let client = Task {
                try await SubprocessRunner().run(
                    Command(argv: [TestPaths.executable("debusine-virt-auxverb"), socket, "cat"]),
                    input: .none, output: .fileDescriptor(writeEnd, closeAfterStart: true), error: .capture)
            }
            // The relay closed the port after a window's worth (4 MiB, plus what the sockets
            // hold), not after taking all 64 MiB into memory.
            let ended = try await outcome()
            #expect(ended == "closed")
            guard ended == "closed" else {
                // Draining would wait for a command that never ends: end it instead.
                close(ends[0])
                _ = try? await client.value
                return
            }
            let drained = try await SubprocessRunner().run(
                Command("wc", ["-c"]), input: .fileDescriptor(ends[0], closeAfterStart: true), output: .capture,
                error: .discard)
            let result = try await client.value
            #expect(result.status == .exited(255))
            #expect(result.errorText.contains("broke the protocol"), "\(result.errorText)")
            #expect(
                (Int(drained.outputText.trimmingCharacters(in: .whitespaces)) ?? .max) <= Frame.window + 2
                    * Frame.maximumPayload)
            // The relay goes on serving, and says why there is no testbed to run in.
            let after = try await SubprocessRunner().run(
                Command(argv: [TestPaths.executable("debusine-virt-auxverb"), relay.socketPath, "true"]), input: .none,
                output: .discard, error: .capture)
            #expect(after.status == .exited(255))
        }
    }

    @Test("frames that arrive in one read before a malformed one reach their command; then the port is closed")
    func framesBeforeAMalformedOne() async throws {
        try await withFakeGuestEnd("exit-then-garbage") { relay, outcome in
            let result = try await SubprocessRunner().run(
                Command(argv: [TestPaths.executable("debusine-virt-auxverb"), relay.socketPath, "true"]), input: .none,
                output: .capture, error: .capture)
            #expect(result.status == .exited(3), "\(result.errorText)")
            #expect(result.outputText == "hello")
            #expect(try await outcome() == "closed")
        }
    }
}

/// The helper's own side of a spawn, spoken to in frames as the relay does: what the command
/// starts with (directory, environment, signals, session) and how a program is looked up.
@Suite("Guest helper: how commands are started")
struct HelperSpawnTests {
    /// One command through `port` on `channel`: its stdout, stderr and exit report.
    static func run(
        _ port: Int32, channel: UInt32, _ argv: [String], environment: [String] = [], directory: String = "/"
    ) throws -> (output: String, error: String, exit: String) {
        var spawn = Frame.spawn(argv: argv, environment: environment, directory: directory)
        spawn.channel = channel
        let bytes = spawn.encoded
        try #require(bytes.withUnsafeBytes { write(port, $0.baseAddress, $0.count) } == bytes.count)
        try #require(write(port, Frame(channel: channel, .stdinEOF).encoded, 9) == 9)
        var decoder = FrameDecoder()
        var output = "", error = ""
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            while let frame = try decoder.next() {
                guard frame.channel == channel else { continue }
                switch frame.kind {
                case .stdout: output += String(decoding: frame.payload, as: UTF8.self)
                case .stderr: error += String(decoding: frame.payload, as: UTF8.self)
                case .exit: return (output, error, String(decoding: frame.payload, as: UTF8.self))
                default: break
                }
            }
            let count = read(port, &buffer, buffer.count)
            try #require(count > 0, "the helper closed its port or went silent")
            decoder.append(buffer[..<count])
        }
    }

    @Test(
        "a command starts in the directory asked for, with no signal ignored or blocked, in a session of its own; PATH is the command's, searched past a directory and a file that cannot run; a file that cannot run exits 126, a missing one or an empty name 127; the helper stays where it was"
    )
    func spawning() async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-spawn.")
        defer { TestPaths.removeTree(directory) }
        let (helper, portPath) = try await HostHelper.listening(in: directory)
        defer { helper.signal(SIGKILL) }
        let port = try TestSockets.connect(to: portPath)
        defer { close(port) }
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        try #require(setsockopt(port, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size)) == 0)
        for name in ["first", "second", "work", "dirs", "dirs/tool"] {
            try FileManager.default.createDirectory(atPath: "\(directory)/\(name)", withIntermediateDirectories: false)
        }
        // The same name twice on PATH: the first cannot be run, the second can.
        try "#!/bin/sh\necho first\n".write(toFile: "\(directory)/first/tool", atomically: false, encoding: .utf8)
        try "#!/bin/sh\necho second\n".write(toFile: "\(directory)/second/tool", atomically: false, encoding: .utf8)
        chmod("\(directory)/first/tool", 0o644)
        chmod("\(directory)/second/tool", 0o755)
        // A directory named like the program first, as execvp passes over.
        let path = "PATH=\(directory)/dirs:\(directory)/first:\(directory)/second"
        func helperDirectory() -> String {
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(helper.pid)/cwd")) ?? "?"
        }
        let home = helperDirectory()

        let found = try Self.run(port, channel: 1, ["tool"], environment: [path])
        #expect(found.output == "second\n" && found.exit == "code 0", "\(found)")
        let notRunnable = try Self.run(port, channel: 2, ["tool"], environment: ["PATH=\(directory)/first"])
        #expect(notRunnable.exit == "code 126", "\(notRunnable)")
        #expect(notRunnable.error.contains("cannot run tool: Permission denied"), "\(notRunnable)")
        let missing = try Self.run(port, channel: 3, ["no-such-tool"], environment: [path])
        #expect(missing.exit == "code 127" && missing.error.contains("cannot run no-such-tool"), "\(missing)")

        let here = try Self.run(port, channel: 4, ["pwd"], directory: "\(directory)/work")
        #expect(here.output == "\(directory)/work\n", "\(here)")
        let root = try Self.run(port, channel: 5, ["pwd"])
        #expect(root.output == "/\n", "\(root)")
        let nowhere = try Self.run(port, channel: 6, ["pwd"], directory: "\(directory)/gone")
        #expect(nowhere.exit == "code 127" && nowhere.error.contains("cannot run pwd"), "\(nowhere)")

        let status = try Self.run(port, channel: 7, ["cat", "/proc/self/status"])
        func mask(_ name: String) -> UInt64? {
            status.output.split(separator: "\n").first { $0.hasPrefix("\(name):\t") }
                .flatMap { UInt64($0.dropFirst(name.count + 2), radix: 16) }
        }
        #expect(mask("SigBlk") == 0, "\(status.output)")
        // Signals 1-31 and the real-time ones are at their default. glibc's posix_spawn leaves its
        // own two (32 and 33, SIGCANCEL and SIGSETXID) ignored in the child; glibc sets them up
        // again in every program it starts.
        #expect(mask("SigIgn").map { $0 & ~0x1_8000_0000 } == 0, "\(status.output)")
        // /proc/self/stat: pid (comm) state ppid pgrp session ...
        let stat = try Self.run(port, channel: 8, ["cat", "/proc/self/stat"])
        let fields = stat.output.split(separator: ")").last?.split(separator: " ") ?? []
        #expect(fields.count > 4 && stat.output.split(separator: " ").first == fields[3], "\(stat.output)")
        // The helper came back to where it was after each command.
        #expect(helperDirectory() == home && home != "?", "the helper is in \(helperDirectory()), not \(home)")
        // An empty program name ends that command, not the helper.
        let empty = try Self.run(port, channel: 9, [""])
        #expect(empty.exit == "code 127" && empty.error.contains("cannot run"), "\(empty)")
        let after = try Self.run(port, channel: 10, ["sh", "-c", "echo ok"], directory: "\(directory)/work")
        #expect(after.output == "ok\n" && after.exit == "code 0", "\(after)")
        #expect(helperDirectory() == home, "the helper is in \(helperDirectory()), not \(home)")
    }
}

@Suite("Exit reports and frame sizes from the guest")
struct CommandEndTests {
    @Test(
        "an exit report out of range is a failure (255), never a wrapped status or a crash",
        arguments: [
            ("code 0", Int32(0)), ("code 255", 253), ("code 256", 255), ("code -1", 255),
            ("code 2147483647", 255), ("signal 9", 137), ("signal 127", 255), ("signal 2147483647", 255),
            ("signal 0", 255), ("signal -128", 255), ("code 99999999999", 255),
        ])
    func clamps(_ payload: String, _ status: Int32) {
        #expect(CommandEnd(payload: Array(payload.utf8)).auxverbStatus == status, "\(payload)")
    }

    @Test("a spawn frame may carry a whole argv past 1 MiB; any other frame past 1 MiB is refused")
    func frameLimits() throws {
        var decoder = FrameDecoder()
        decoder.append(Frame(.spawn, [UInt8](repeating: 0x61, count: 6 << 20)).encoded)
        #expect(try decoder.next()?.payload.count == 6 << 20)
        decoder.append(Frame(.stdout, [UInt8](repeating: 0x61, count: Frame.maximumPayload + 1)).encoded)
        #expect(throws: FrameDecoder.DecodeError.oversized(Frame.maximumPayload + 1)) { try decoder.next() }
        var spawns = FrameDecoder()
        spawns.append(Frame(.spawn, [UInt8](repeating: 0x61, count: Frame.maximumSpawnPayload + 1)).encoded)
        #expect(throws: FrameDecoder.DecodeError.oversized(Frame.maximumSpawnPayload + 1)) { try spawns.next() }
    }
}

@Suite("Guest helper script")
struct GuestHelperScriptTests {
    @Test("the helper imports only modules that Debian's python3-minimal ships")
    func importsOnlyMinimalModules() {
        // What /usr/lib/python3.11 of libpython3.11-minimal provides (plus built-in modules).
        let minimal: Set<String> = [
            "errno", "fcntl", "os", "select", "signal", "socket", "stat", "struct", "sys", "time",
        ]
        var imported: Set<String> = []
        for line in GuestHelperScript.source.split(separator: "\n") {
            let words = line.split(separator: " ")
            if words.first == "import" {
                for name in words.dropFirst().joined(separator: " ").split(separator: ",") {
                    imported.insert(name.trimmingCharacters(in: .whitespaces))
                }
            } else if words.first == "from" && words.count > 1 {
                imported.insert(String(words[1]))
            }
        }
        #expect(!imported.isEmpty)
        #expect(imported.subtracting(minimal).isEmpty, "not in python3-minimal: \(imported.subtracting(minimal))")
    }

    @Test("the helper's version is the digest of its program file, so a changed helper is a new version")
    func versionFromBytes() throws {
        let file = "\(TestPaths.repositoryRoot)/Sources/GuestHelper/Resources/guest-helper.py"
        let bytes = try Data(contentsOf: URL(fileURLWithPath: file))
        #expect(Array(GuestHelperScript.source.utf8) == Array(bytes), "the embedded program is the file")
        #expect(GuestHelperScript.version == String(SHA256.hexDigest(of: Array(bytes)).prefix(16)))
        var changed = Array(bytes)
        changed.append(UInt8(ascii: "\n"))
        #expect(GuestHelperScript.version != String(SHA256.hexDigest(of: changed).prefix(16)))
    }

    @Test(
        "the relay's frame buffers hold exactly a frame's encoding",
        arguments: [
            Frame(channel: 0, .hello, []), Frame(channel: 0x0102_0304, .stdout, Array(repeating: 0xAB, count: 70_000)),
            Frame(channel: UInt32.max, .exit, Array("code 3".utf8)),
        ])
    func frameBuffers(_ frame: Frame) {
        #expect(Array(frame.buffer.readableBytesView) == frame.encoded)
    }

    @Test("Python's frame kinds are GuestChannel's, value for value")
    func frameKindsAgree() throws {
        // The helper's two constant lines: `SPAWN, STDIN, ... = 1, 2, ...`.
        let names: [String: Frame.Kind] = [
            "SPAWN": .spawn, "STDIN": .stdin, "STDIN_EOF": .stdinEOF, "KILL": .kill, "CREDIT": .credit,
            "PING": .ping, "RESUMED": .resumed, "STDOUT": .stdout, "STDERR": .stderr, "EXIT": .exit,
            "STDIN_CREDIT": .stdinCredit, "PONG": .pong, "HELLO": .hello,
        ]
        var seen: [String: UInt8] = [:]
        for line in GuestHelperScript.source.split(separator: "\n") where line.contains(" = ") {
            let sides = line.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            let left = sides[0].split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            let right = sides[1].split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            guard left.count == right.count, left.allSatisfy({ names[$0] != nil }) else { continue }
            for (name, value) in zip(left, right) {
                seen[name] = value.hasPrefix("0x") ? UInt8(value.dropFirst(2), radix: 16) : UInt8(value)
            }
        }
        #expect(Set(seen.keys) == Set(names.keys), "constants found: \(seen.keys.sorted())")
        for (name, kind) in names { #expect(seen[name] == kind.rawValue, "\(name)") }
    }

    @Test("a helper of another version is refused, naming both versions")
    func otherVersionRefused() async throws {
        try await HostHelper.withListening(version: "0123456789abcdef") { directory, port in
            let relay = AuxverbRelay(socketPath: "\(directory)/aux.sock")
            let relayTask = Task { try? await relay.run(guestPortPath: port) }
            defer { relayTask.cancel() }
            let error = await #expect(throws: VirtError.self) {
                _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(30))
            }
            #expect(
                error?.message
                    == "the guest helper is version 0123456789abcdef, not this server's \(GuestHelperScript.version)")
        }
    }

    @Test("a hello is not enough: the helper counts as up once clients can connect to the relay")
    func helperUpOnlyWhenServed() async throws {
        try await HostHelper.withListening { directory, port in
            // The stream is carried beside the serving: its hello can come first (CI saw four
            // commands refused so at once). Here it always does.
            let relay = AuxverbRelay(socketPath: "\(directory)/aux.sock")
            let guest = try await AuxverbRelay.connect(port)
            let carrying = Task { await relay.carry(guest) }
            defer { carrying.cancel() }
            let hello = await Deadline(after: .seconds(30)).poll(every: .milliseconds(10)) {
                await relay.helperBootID != nil
            }
            #expect(hello)
            let early = await #expect(throws: VirtError.self) {
                _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(1))
            }
            #expect(early?.code == .timeout)
            let serving = Task { try await relay.serve() }
            defer { serving.cancel() }
            _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(30))
            let client = try TestSockets.connect(to: relay.socketPath)
            close(client)
        }
    }

    @Test("a relay stopped while clients connect ends cleanly: no connection is dropped untaken")
    func stopWhileConnecting() async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-aux.")
        defer { TestPaths.removeTree(directory) }
        for round in 0..<20 {
            let relay = AuxverbRelay(socketPath: "\(directory)/aux\(round).sock")
            let serving = Task { try await relay.serve() }
            #expect(
                await Deadline(after: .seconds(30)).poll(every: .milliseconds(5)) {
                    access(relay.socketPath, F_OK) == 0
                })
            // Connections still arriving as the relay stops: NIO traps (the whole process) on
            // one accepted and never taken.
            let connecting = Task.detached {
                for _ in 0..<30 { if let fd = try? TestSockets.connect(to: relay.socketPath) { close(fd) } }
            }
            try await Task.sleep(for: .milliseconds(round % 5))
            serving.cancel()
            try await serving.value
            await connecting.value
        }
    }

    @Test("a relay that cannot listen fails the wait for its helper with its reason")
    func relayCannotListen() async throws {
        try await HostHelper.withListening { directory, port in
            let relay = AuxverbRelay(socketPath: "\(directory)/missing/aux.sock")
            let relayTask = Task { try await relay.run(guestPortPath: port) }
            defer { relayTask.cancel() }
            let error = await #expect(throws: VirtError.self) {
                _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(30))
            }
            #expect(error?.message.hasPrefix("the auxverb relay failed: ") == true, "\(error?.message ?? "")")
            // One source of truth: what the relay says when asked is what the wait threw.
            #expect(await relay.listenFailure == error?.message)
            await #expect(throws: VirtError.self) { try await relayTask.value }
        }
    }

    @Test("the helper is valid Python 3")
    func compiles() async throws {
        let result = try await SubprocessRunner().run(
            Command("/usr/bin/python3", ["-c", "import sys; compile(sys.stdin.read(), 'helper', 'exec')"]),
            input: .bytes(Array(GuestHelperScript.source.utf8)))
        #expect(result.status == .exited(0), "\(result.errorText)")
    }
}

/// A blocking client of the helper's `--listen` socket, for tests that must hold the port
/// still, which the relay never does.
enum RawPort {
    static func connect(_ path: String) throws -> Int32 {
        let fd = try TestSockets.connect(to: path)
        // A helper that stops answering fails the test instead of hanging it.
        var limit = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    static func send(_ fd: Int32, _ frame: Frame) -> Bool {
        let bytes = frame.encoded
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress.map { $0 + offset }, $0.count - offset) }
            guard written > 0 else { return false }
            offset += written
        }
        return true
    }
}
