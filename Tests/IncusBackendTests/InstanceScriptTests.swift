import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import IncusBackend

/// The scripts the Incus backend puts into instances, run on the host (both are plain sh).
@Suite("The auxverb wrapper and the container generator, run on the host")
struct InstanceScriptTests {
    let runner = SubprocessRunner()

    func install(_ text: String, in directory: String, as name: String) async throws -> String {
        let path = "\(directory)/\(name)"
        try await TestPaths.writeExecutable(path, text)
        return path
    }

    @Test(
        "framed through debusine-virt-auxverb --exec: argv, statuses, a login environment, both streams and stdin byte for byte, SIGTERM, SIGPIPE, broken runners"
    )
    func framed() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-framed.")
        defer { TestPaths.removeTree(work) }
        let wrapper = try await install(AuxverbWrapper.script, in: work, as: "auxverb")
        let auxverb = [TestPaths.executable("debusine-virt-auxverb"), "--exec", "2", wrapper, "--framed"]
        func run(
            _ argv: [String], input: CommandInput = .none, limit: Int = 1 << 20, environment: [String: String?] = [:]
        ) async throws -> CommandResult {
            try await runner.run(
                Command(auxverb[0], Array(auxverb.dropFirst()) + argv, environment: environment), input: input,
                output: .capture(limit: limit), error: .capture)
        }
        #expect(try await run(["sh", "-c", "exit 3"]).status == .exited(3))
        #expect(try await run(["sh", "-c", "exit 255"]).status == .exited(253))
        #expect(try await run(["sh", "-c", "kill -TERM $$"]).status == .exited(143))
        let missing = try await run(["/nonexistent/program"])
        #expect(missing.status == .exited(127) && missing.errorText.contains("/nonexistent/program"))
        let words = ["a b", "", "ü€", "$(id)", "%2C,x", "-n", "*", "--framed"]
        #expect(try await run(["printf", "[%s]"] + words).outputText == words.map { "[\($0)]" }.joined())
        let both = try await run(["sh", "-c", "echo out; echo err >&2"])
        #expect(both.outputText == "out" && both.errorText == "err")
        let environment = try await run(["env"], environment: ["SECRET_FROM_CALLER": "x", "TERM": "vt100"])
            .outputText.split(separator: "\n")
        #expect(environment.contains("HOME=/root"))
        #expect(environment.contains("TERM=vt100"))
        #expect(!environment.contains { $0.hasPrefix("SECRET_FROM_CALLER=") })
        // Without --framed, or without a command: a usage error, nothing run.
        let wrapperAlone = try await runner.run(Command(wrapper, ["touch", "\(work)/ran"]))
        #expect(wrapperAlone.status == .exited(253) && wrapperAlone.errorText.contains("usage"))
        #expect(!FileManager.default.fileExists(atPath: "\(work)/ran"))
        // 8 MiB of every byte value in and out again; 32 MiB out.
        let data = (0..<(8 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 7) }
        let echoed = try await run(["cat"], input: .bytes(data), limit: 16 << 20)
        #expect(echoed.status == .exited(0) && echoed.standardOutput == data)
        let big = try await run(["sh", "-c", "head -c 33554432 /dev/zero"], limit: 64 << 20)
        #expect(big.standardOutput.count == 33_554_432)
        // A command that reads none of its stdin, and one that leaves a process holding stdout.
        let clock = ContinuousClock()
        var start = clock.now
        #expect(try await run(["true"], input: .bytes(data)).status == .exited(0))
        let leaked = try await run(["sh", "-c", "sleep 300 & echo $!"])
        #expect(clock.now - start < .seconds(60))
        if let pid = Int32(leaked.outputText) { kill(pid, SIGKILL) }
        // Our reader gone: the command gets SIGPIPE, as it would writing to a closed pipe.
        let reader = try await runner.run(
            Command(
                "bash",
                ["-c", #""$@" | head -c 10 >/dev/null; echo "${PIPESTATUS[0]}""#, "bash"]
                    + auxverb + ["sh", "-c", "exec yes"]))
        #expect(reader.outputText == "141", "\(reader.outputText) \(reader.errorText)")
        // SIGTERM to debusine-virt-auxverb reaches the command.
        let marker = "\(work)/terminated"
        let task = Task {
            try await runner.run(
                Command(
                    argv: auxverb + ["sh", "-c", "trap 'touch \"$1\"; exit 0' TERM; sleep 30 & wait", "sh", marker]))
        }
        try await Task.sleep(for: .milliseconds(500))
        _ = try await runner.run(
            Command(
                "pkill",
                // Only this test's auxverb (its marker is in the argv): others run in parallel.
                ["-TERM", "-f", "^\(TestPaths.executable("debusine-virt-auxverb")) --exec 2 .*\(marker)$"]))
        let terminated = try await task.value
        #expect(FileManager.default.fileExists(atPath: marker), "the command saw the SIGTERM")
        #expect(terminated.status == .exited(0))
        // A runner that ends without the exit frame: the auxverb's own failure, 255.
        let program = TestPaths.executable("debusine-virt-auxverb")
        let early = try await runner.run(Command(program, ["--exec", "3", "sh", "-c", "exit 7", "true"]))
        #expect(early.status == .exited(255))
        #expect(
            early.errorText.contains("ended (status 7) before the command's end came through"), "\(early.errorText)")
        // Each of these hung once (`timeout -s KILL` turns a hang into 137): our reader going
        // away while stdin still flows; stdin for a command that closed both of its outputs;
        // a runner that writes on after a malformed frame.
        start = clock.now
        let hangs = try await runner.run(
            Command(
                "bash",
                [
                    "-c",
                    #"""
                    head -c 20000000 /dev/zero | timeout -s KILL 60 "$@" cat | { sleep 1; head -c 10 >/dev/null; }
                    echo "${PIPESTATUS[1]}"
                    (sleep 0.5; head -c 100000 /dev/zero) | timeout -s KILL 60 "$@" sh -c 'exec cat > "$1" 2>&1' sh "$0"
                    echo "$? $(wc -c < "$0")"
                    """#,
                    "\(work)/closed-outputs",
                ] + auxverb))
        #expect(hangs.outputText == "141\n0 100000", "\(hangs.outputText) \(hangs.errorText)")
        let malformed = try await runner.run(
            Command(
                "timeout",
                [
                    "-s", "KILL", "60", program, "--exec", "3", "sh", "-c",
                    #"printf '\001\002\003\004\377\0\0\0\0'; exec yes"#,
                ]
                    + ["true"]))
        #expect(malformed.status == .exited(255) && malformed.errorText.contains("protocol error"))
        // The same with stdin to send, to a runner that reads none of it (the stdin pump is
        // blocked writing to it), and a runner that closes its stdout but lives on.
        let unread = try await runner.run(
            Command(
                "timeout",
                [
                    "-s", "KILL", "60", program, "--exec", "3", "sh", "-c",
                    #"printf '\001\002\003\004\377\0\0\0\0'; exec sleep 300"#, "true",
                ]),
            input: .bytes(data))
        #expect(unread.status == .exited(255) && unread.errorText.contains("protocol error"), "\(unread.errorText)")
        // Our reader gone while the command writes on and reads none of its stdin, which keeps
        // coming: when the SIGPIPE frame cannot get past the stdin queued before it, the runner
        // is killed instead, after 5 s (255); whether it can is a race (141).
        let unreadAndGone = try await runner.run(
            Command(
                "bash",
                [
                    "-c",
                    #"yes | timeout -s KILL 60 "$@" sh -c 'exec yes' | head -c 1 >/dev/null; echo "${PIPESTATUS[1]}""#,
                    "bash",
                ] + auxverb))
        #expect(
            ["141", "255"].contains(unreadAndGone.outputText), "\(unreadAndGone.outputText) \(unreadAndGone.errorText)")
        let silent = try await runner.run(
            Command("timeout", ["-s", "KILL", "60", program, "--exec", "3", "sh", "-c", "exec sleep 300 >&-", "true"]),
            input: .bytes(data))
        #expect(silent.status == .exited(255) && silent.errorText.contains("ended (signal 9)"), "\(silent.errorText)")
        #expect(clock.now - start < .seconds(60))
        // The same with a pause in stdin once the wrapper holds the 1 MiB it buffers for the
        // command: the SIGPIPE frame goes out but sits unread behind that stdin (CI hung so), and
        // the command's stdout, still written to 2 s later, gets the runner killed. Two sizes in
        // that window here (it moves with pipe sizes: either status will do), all at once; and a
        // command that ignores SIGPIPE, whose stdout the wrapper closes: it sees EPIPE and ends
        // as it would on a real pipe (yes: 1, "Broken pipe").
        let paused = try await runner.run(
            Command(
                "bash",
                [
                    "-c",
                    #"""
                    one() {
                        { head -c "$1" /dev/zero; sleep 8; } | timeout -s KILL 30 "${@:3}" sh -c "$2" |
                            head -c 20000000 >/dev/null
                        echo "$1 ${PIPESTATUS[1]}"
                    }
                    for size in 1150000 1200000; do
                        one "$size" 'exec yes' "$@" &
                    done
                    one 0 "trap '' PIPE; exec yes" "$@" &
                    wait
                    """#,
                    "bash",
                ] + auxverb))
        let statuses = paused.outputText.split(separator: "\n").map { $0.split(separator: " ") }
        #expect(statuses.count == 3, "\(paused.outputText) \(paused.errorText)")
        for status in statuses {
            let expected: [Substring] = status.first == "0" ? ["1"] : ["141", "255"]
            #expect(
                status.count == 2 && expected.contains(status[1]), "\(paused.outputText) \(paused.errorText)")
        }
        #expect(paused.errorText.contains("Broken pipe"), "yes saw EPIPE: \(paused.errorText)")
    }

    @Test(
        "--login (through the guest helper): the command exec'd with the environment --framed gives, its status as is, a missing command 127 naming it"
    )
    func login() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-login.")
        defer { TestPaths.removeTree(work) }
        let wrapper = try await install(AuxverbWrapper.script, in: work, as: "auxverb")
        // Exactly what the guest helper gives every command (its BASE_ENV), and a terminal's TERM.
        let helperEnvironment = [
            "PATH=/usr/bin:/bin", "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/bash", "LANG=C.UTF-8",
            "TERM=vt100",
        ]
        func login(_ argv: [String]) async throws -> CommandResult {
            try await runner.run(
                Command("/usr/bin/env", ["-i"] + helperEnvironment + [wrapper, "--login"] + argv), input: .none,
                output: .capture, error: .capture)
        }
        let framed = try await runner.run(
            Command(
                "/usr/bin/env",
                ["-i"] + helperEnvironment + ["SECRET_FROM_CALLER=x"]
                    + [TestPaths.executable("debusine-virt-auxverb"), "--exec", "2", wrapper, "--framed", "env"]))
        let loginEnvironment = try await login(["env"]).outputText
        #expect(
            Set(loginEnvironment.split(separator: "\n")) == Set(framed.outputText.split(separator: "\n")),
            "--login:\n\(loginEnvironment)\n--framed:\n\(framed.outputText)")
        #expect(loginEnvironment.contains("TERM=vt100"))
        #expect(try await login(["sh", "-c", "exit 255"]).status == .exited(255), "mapped by the auxverb, not here")
        #expect(try await login(["sh", "-c", "kill -TERM $$"]).status == .signaled(SIGTERM), "exec'd: nothing between")
        let missing = try await login(["no-such-program-here"])
        #expect(missing.status == .exited(127))
        #expect(missing.errorText == "no-such-program-here: No such file or directory")
    }

    @Test("the generator does nothing outside LXC, and in LXC masks, relaxes and tolerates what containers lack")
    func generator() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-generator.")
        defer { TestPaths.removeTree(work) }
        let generator = try await install(ContainerGenerator.script, in: work, as: "lxc")
        let outside = "\(work)/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: false)
        let none = try await runner.run(
            Command(generator, [outside, outside, outside], environment: ["SYSTEMD_VIRTUALIZATION": "vm:kvm"]))
        #expect(none.status == .exited(0))
        #expect(TestPaths.contents(of: outside).isEmpty)

        let inside = "\(work)/inside"
        try FileManager.default.createDirectory(atPath: inside, withIntermediateDirectories: false)
        let result = try await runner.run(
            Command(generator, [inside, inside, inside], environment: ["SYSTEMD_VIRTUALIZATION": "container:lxc"]))
        #expect(result.status == .exited(0), "\(result.errorText)")
        for unit in ["dev-hugepages.mount", "systemd-journald-audit.socket", "systemd-modules-load.service"] {
            #expect(
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(inside)/\(unit)")) == "/dev/null",
                "\(unit) is masked")
        }
        let service = try String(contentsOfFile: "\(inside)/service.d/debusine-virt-container.conf", encoding: .utf8)
        #expect(service.hasPrefix("[Service]\n"))
        #expect(service.contains("ProtectControlGroups=no"))
        let sysctl = try String(
            contentsOfFile: "\(inside)/systemd-sysctl.service.d/debusine-virt-container.conf", encoding: .utf8)
        #expect(sysctl.contains("ExecStart=-"))
        // A second run (every boot runs it) is just as happy.
        let again = try await runner.run(
            Command(generator, [inside, inside, inside], environment: ["SYSTEMD_VIRTUALIZATION": "container:lxc"]))
        #expect(again.status == .exited(0), "\(again.errorText)")
    }
}
