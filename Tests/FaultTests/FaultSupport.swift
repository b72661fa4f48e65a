import CommandRunner
import Foundation
import Synchronization
import Testing
import VirtCore
import VirtTestSupport

/// Every fault test runs inside this suite. Its suites run side by side, each one test at a
/// time; a test that runs QEMU guests waits for a guest slot (the load test, for all of them),
/// so that no more guests run at once than in the rest of the test run. (The whole suite one
/// test at a time took 634 s of CI's phase 2 with a fifth of the CPU idle.)
@Suite("Fault suite")
enum FaultSuite {}

/// The two real backends the fault suite runs against.
enum Backend: String, Sendable, CustomStringConvertible {
    case qemu, incus

    var description: String { rawValue }

    static let imageDirectory = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_IMAGES"]
    static let incusImage = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_INCUS_IMAGE"]
    /// In CI a missing image or daemon fails the tests instead of skipping them.
    static let qemuEnabled = imageDirectory != nil || TestPaths.isCI
    static let incusEnabled = incusImage != nil || TestPaths.isCI

    static func qcow2() throws -> String {
        "\(try #require(imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test"))/bookworm-amd64.qcow2"
    }

    static func artifact() throws -> String {
        try #require(incusImage, "DEBUSINE_VIRT_INCUS_IMAGE is not set: run through scripts/test")
    }

    /// How long to let a step get going before interrupting it: VMs under TCG are slow.
    var settle: Duration { self == .qemu ? .seconds(4) : .milliseconds(800) }
}

/// A server started for one fault, with a private TMPDIR so that anything it leaves behind
/// (instance directories, sockets, QEMU processes naming them) can be found afterwards.
struct ServerUnderTest {
    let backend: Backend
    let parent: String
    let process: ServerProcess

    /// Starts the server and reads its banner.
    static func start(
        _ backend: Backend, options: [String] = [], image: String? = nil, parent: String? = nil,
        environment: [String: String] = [:]
    ) async throws -> ServerUnderTest {
        let parent = try parent ?? TestPaths.makeTemporaryDirectory("dv-fault.")
        let argv: [String]
        switch backend {
        case .qemu:
            argv =
                [
                    TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--boot-timeout",
                    "900",
                ]
                + options + [try image ?? Backend.qcow2()]
        case .incus:
            argv = [TestPaths.executable("debusine-virt-incus")] + options + [try image ?? Backend.artifact()]
        }
        let process = try ServerProcess(argv, environment: environment.merging(["TMPDIR": parent]) { $1 })
        let banner = try await process.readLine(timeout: .seconds(120))
        try #require(banner == "ok", "no banner: \(banner ?? "end of output"); stderr:\n\(process.standardError)")
        return ServerUnderTest(backend: backend, parent: parent, process: process)
    }

    /// `open`, returning the scratch directory. Its wait outlasts the server's own boot timeout
    /// (900 s), so that a boot that never ends is the server's error, and a wait that runs out
    /// anyway says what the server said.
    func open() async throws -> String {
        let reply: String
        do {
            reply = try await process.request("open", timeout: .seconds(960))
        } catch {
            Issue.record("open: \(error); stderr:\n\(process.standardError.suffix(8000))")
            throw error
        }
        try #require(reply.hasPrefix("ok /"), "open failed: \(reply)\n\(process.standardError)")
        return String(reply.dropFirst(3))
    }

    func auxverb() async throws -> [String] {
        try ProtocolWords.auxverb(fromReply: try await process.request("print-execute-command"))
    }

    /// What the server left behind: entries in its TMPDIR, processes naming it (QEMU), and
    /// Incus instances labelled with its pid.
    func leftovers() async throws -> [String] {
        var found = TestPaths.contents(of: parent).map { "\(parent)/\($0)" }
        let runner = SubprocessRunner()
        let processes = try await runner.run(Command("pgrep", ["-a", "-f", parent]))
        found += processes.outputText.split(separator: "\n").map { "process \($0)" }
        if backend == .incus { found += try await Self.instances(ownedBy: process.pid).map { "instance \($0)" } }
        return found
    }

    /// The Incus instances whose server label is `pid`.
    static func instances(ownedBy pid: pid_t) async throws -> [String] {
        let listing = try await SubprocessRunner().check(
            Command("incus", ["list", "debusine-virt-", "--format", "json"]))
        let value = try JSONSerialization.jsonObject(with: Data(listing.utf8)) as? [[String: Any]] ?? []
        return value.compactMap { instance in
            let configuration = instance["config"] as? [String: Any] ?? [:]
            guard configuration["user.debusine-virt.pid"] as? String == String(pid) else { return nil }
            return instance["name"] as? String
        }
    }

    /// The Incus instance the auxverb reaches now (a container's hostname is its name): with
    /// spares, a server owns a second instance, made for the next revert.
    static func runningInstance(_ auxverb: [String]) async throws -> String {
        try await SubprocessRunner().check(Command(argv: auxverb + ["cat", "/proc/sys/kernel/hostname"]))
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Stops the server if it still runs and removes its TMPDIR.
    func discard() async {
        process.signal(SIGKILL)
        _ = try? await process.wait(timeout: .seconds(30))
        if backend == .incus {
            for name in (try? await Self.instances(ownedBy: process.pid)) ?? [] {
                _ = try? await SubprocessRunner().run(Command("incus", ["delete", "--force", name]))
            }
        }
        TestPaths.removeTree(parent)
    }
}

/// A program's path on PATH (ServerProcess wants one).
func executablePath(_ name: String) throws -> String {
    if name.contains("/") { return name }
    for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":")
    where access("\(directory)/\(name)", X_OK) == 0 {
        return "\(directory)/\(name)"
    }
    throw VirtError(.notFound, "\(name) is not on PATH")
}

/// Starts an auxverb command as its own process, with the program resolved on PATH.
func startAuxverb(_ auxverb: [String], _ argv: [String]) throws -> ServerProcess {
    let full = auxverb + argv
    return try ServerProcess([try executablePath(full[0])] + full.dropFirst())
}

/// The checks of one fault case: each failure is a test issue, and whether they all held goes
/// into the suite's report (docs/reliability.md).
final class Checks: Sendable {
    private let failures = Mutex<[String]>([])

    func expect(
        _ condition: Bool, _ message: @autoclosure () -> String, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        guard !condition else { return }
        let text = message()
        failures.withLock { $0.append(text) }
        Issue.record(Comment(rawValue: text), sourceLocation: sourceLocation)
    }

    var held: Bool { failures.withLock { $0.isEmpty } }
}

/// Runs one fault case and adds a line to the report named by DEBUSINE_VIRT_FAULT_REPORT (set by
/// scripts/test; scripts/fault-table turns it into docs/reliability.md). A `hostile` case is an
/// attack by what the security model does not trust (an image, a tarball, a test in the
/// testbed), and goes into the table of hostile input.
func faultCase(
    _ backend: String, _ fault: String, expected: String, hostile: Bool = false,
    _ body: (Checks) async throws -> Void
) async throws {
    let checks = Checks()
    do {
        try await body(checks)
    } catch {
        FaultReport.add(backend: backend, fault: fault, expected: expected, hostile: hostile, held: false)
        throw error
    }
    FaultReport.add(backend: backend, fault: fault, expected: expected, hostile: hostile, held: checks.held)
}

enum FaultReport {
    struct Line: Codable {
        var backend: String
        var fault: String
        var expected: String
        var hostile: Bool
        var held: Bool
    }

    static func add(backend: String, fault: String, expected: String, hostile: Bool, held: Bool) {
        guard let path = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_FAULT_REPORT"],
            let data = try? JSONEncoder().encode(
                Line(backend: backend, fault: fault, expected: expected, hostile: hostile, held: held))
        else { return }
        // One write of a short line with O_APPEND: lines from parallel tests do not mix.
        let fd = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        defer { Glibc.close(fd) }
        let bytes = Array(data) + [0x0A]
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }
}

/// A file of `size` bytes, sparse: copying it still moves every byte.
func makeSparseFile(_ path: String, size: Int) throws {
    let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw VirtError(.io, "cannot create \(path)") }
    defer { Glibc.close(fd) }
    guard ftruncate(fd, off_t(size)) == 0 else { throw VirtError(.io, "cannot size \(path)") }
}

/// A unix-socket relay to another socket (Python, on the host), to make a daemon unreachable
/// and reachable again without touching the daemon other tests use.
struct SocketProxy {
    let process: ServerProcess
    let listen: String

    static let script = #"""
        import os, socket, sys, threading
        listen, target = sys.argv[1], sys.argv[2]
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(listen)
        server.listen(64)
        print("ready", flush=True)

        def pump(source, sink):
            try:
                while True:
                    data = source.recv(65536)
                    if not data:
                        break
                    sink.sendall(data)
            except OSError:
                pass
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        while True:
            client, _ = server.accept()
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()
        """#

    static func start(listen: String, forwardTo target: String) throws -> SocketProxy {
        unlink(listen)
        let process = try ServerProcess(["/usr/bin/python3", "-c", script, listen, target])
        let deadline = ContinuousClock.now + .seconds(30)
        while access(listen, F_OK) != 0 {
            guard ContinuousClock.now < deadline else { throw VirtError(.timeout, "the socket proxy did not start") }
            usleep(10_000)
        }
        return SocketProxy(process: process, listen: listen)
    }

    /// Kills the relay and every connection through it, and removes its socket.
    func stop() async {
        process.signal(SIGKILL)
        _ = try? await process.wait(timeout: .seconds(30))
        unlink(listen)
    }
}
