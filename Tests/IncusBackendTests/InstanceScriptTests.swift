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

    @Test("the wrapper keeps argv, maps 255 to 253 and signals to 128+N, gives a login environment, forwards SIGTERM")
    func wrapper() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-wrapper.")
        defer { TestPaths.removeTree(work) }
        let wrapper = try await install(AuxverbWrapper.script, in: work, as: "auxverb")
        func run(_ argv: [String], environment: [String: String?] = [:]) async throws -> CommandResult {
            try await runner.run(Command(wrapper, argv, environment: environment))
        }
        #expect(try await run(["sh", "-c", "exit 3"]).status == .exited(3))
        #expect(try await run(["sh", "-c", "exit 255"]).status == .exited(253))
        #expect(try await run(["sh", "-c", "kill -TERM $$"]).status == .exited(143))
        #expect(try await run(["/nonexistent/program"]).status == .exited(127))
        let words = ["a b", "", "ü€", "$(id)", "%2C,x", "-n", "*"]
        #expect(try await run(["printf", "[%s]"] + words).outputText == words.map { "[\($0)]" }.joined())
        let both = try await run(["sh", "-c", "echo out; echo err >&2"])
        #expect(both.outputText == "out" && both.errorText == "err")
        let environment = try await run(["env"], environment: ["SECRET_FROM_CALLER": "x", "TERM": "vt100"])
            .outputText.split(separator: "\n")
        #expect(environment.contains("HOME=/root"))
        #expect(environment.contains("TERM=vt100"))
        #expect(!environment.contains { $0.hasPrefix("SECRET_FROM_CALLER=") })
        // Returns when the command exits although a background process still holds stdout.
        let clock = ContinuousClock()
        let start = clock.now
        let leaked = try await run(["sh", "-c", "sleep 300 & echo $!"])
        #expect(clock.now - start < .seconds(60))
        if let pid = Int32(leaked.outputText) { kill(pid, SIGKILL) }
        // 32 MiB through stdout, byte for byte.
        let big = try await runner.run(
            Command(wrapper, ["sh", "-c", "head -c 33554432 /dev/zero"]), input: .none,
            output: .capture(limit: 64 << 20), error: .capture)
        #expect(big.standardOutput.count == 33_554_432)
        // SIGTERM to the wrapper reaches the command.
        let marker = "\(work)/terminated"
        let task = Task {
            try await runner.run(
                Command(wrapper, ["sh", "-c", "trap 'touch \"$1\"; exit 0' TERM; sleep 30 & wait", "sh", marker]))
        }
        try await Task.sleep(for: .milliseconds(500))
        _ = try await runner.run(Command("pkill", ["-TERM", "-f", "^perl -e .* sh -c trap"]))
        _ = try? await task.value
        #expect(FileManager.default.fileExists(atPath: marker), "the command saw the SIGTERM")
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
