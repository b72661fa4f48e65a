import CommandRunner
import Foundation
import VirtClient
import VirtCore
import VirtProtocol

/// Drives any virt server, given its command line, through the protocol as autopkgtest does,
/// and times each part of a session.
public struct BenchmarkRunner: Sendable {
    public var label: String
    public var server: [String]
    public var workload: Workload
    /// Where the host files go; a private directory is made in it.
    public var workParent: String
    private let runner = SubprocessRunner()

    public init(label: String, server: [String], workload: Workload, workParent: String) {
        self.label = label
        self.server = server
        self.workload = workload
        self.workParent = workParent
    }

    /// Runs every repetition and returns the figures; the first failure ends the run.
    public func run() async throws -> BenchmarkResult {
        guard let program = server.first else { throw VirtError(.usage, "no server command line given") }
        let argv = [try Self.resolve(program)] + server.dropFirst()
        let directory = try PrivateDirectory.make(in: workParent, prefix: "virt-bench.")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        log.info("\(label): preparing \(workload.treeFiles) files and two random files in \(directory)")
        let files = try HostFiles.make(in: directory, workload: workload)
        var repetitions: [[Metric: Double]] = []
        for number in 1...max(1, workload.repetitions) {
            log.info("\(label): repetition \(number) of \(workload.repetitions)")
            repetitions.append(try await repetition(argv: argv, files: files))
        }
        return BenchmarkResult(label: label, server: server, workload: workload, repetitions: repetitions)
    }

    /// One whole session, from starting the server to its exit.
    private func repetition(argv: [String], files: HostFiles) async throws -> [Metric: Double] {
        try? FileManager.default.removeItem(atPath: files.back)
        try FileManager.default.createDirectory(atPath: files.back, withIntermediateDirectories: false)
        let clock = ContinuousClock()
        var figures: [Metric: Double] = [:]
        let started = clock.now
        let process = try ServerProcess(argv)
        let session = Session(process: process, timeout: .seconds(workload.stepTimeoutSeconds), label: label)
        do {
            _ = try await session.step("the banner") { try await session.expectLine("ok") }
            figures[.banner] = (clock.now - started).seconds

            let capabilities = Set(try await session.request("capabilities").split(separator: " ").map(String.init))
                .subtracting(workload.skipped)
            var scratch = try await timed(.open, into: &figures) { try await session.requestWord("open") }
            let auxverb = try await timed(.printExecuteCommand, into: &figures) {
                try ProtocolWords.auxverb(fromReply: try await session.request("print-execute-command"))
            }

            var latencies: [Double] = []
            for _ in 0..<workload.auxverbCalls {
                let callStart = clock.now
                try await session.step("auxverb true") { try await self.check(auxverb + ["true"]) }
                latencies.append((clock.now - callStart).seconds)
            }
            figures[.auxverbMedian] = Statistics.median(latencies)
            figures[.auxverbP95] = Statistics.percentile(latencies, 95)

            let inTestbed = scratch + "/stream.bin"
            let stdinTime = try await measure {
                try await session.step("auxverb stdin") {
                    try await self.check(
                        auxverb + ["sh", "-c", #"cat > "$1""#, "sh", inTestbed], input: .file(files.stream))
                }
            }
            figures[.stdinThroughput] = Double(workload.streamBytes) / 1e6 / stdinTime
            let streamBack = files.back + "/stream.bin"
            let stdoutTime = try await measure {
                try await session.step("auxverb stdout") {
                    try await self.check(auxverb + ["cat", inTestbed], output: .file(streamBack))
                }
            }
            figures[.stdoutThroughput] = Double(workload.streamBytes) / 1e6 / stdoutTime
            try await verifySame(files.stream, streamBack, what: "the bytes streamed through the auxverb")

            let copyInTestbed = scratch + "/copy.bin"
            let copyBack = files.back + "/copy.bin"
            try await timed(.copydownFile, into: &figures) {
                try await session.requestOK("copydown", files.copy, copyInTestbed)
            }
            try await timed(.copyupFile, into: &figures) {
                try await session.requestOK("copyup", copyInTestbed, copyBack)
            }
            try await verifySame(files.copy, copyBack, what: "the file copied down and up")

            let treeName = (files.tree as NSString).lastPathComponent
            let treeInTestbed = "\(scratch)/\(treeName)/"
            let treeBack = "\(files.back)/\(treeName)/"
            try await timed(.copydownTree, into: &figures) {
                try await session.requestOK("copydown", files.tree + "/", treeInTestbed)
            }
            try await timed(.copyupTree, into: &figures) {
                try await session.requestOK("copyup", treeInTestbed, treeBack)
            }
            try await verifySame(files.tree, treeBack, what: "the tree copied down and up")

            if capabilities.contains("revert") {
                scratch = try await timed(.revert, into: &figures) { try await session.requestWord("revert") }
            }
            if capabilities.contains("reboot") {
                try await timed(.reboot, into: &figures) { try await session.requestOK("reboot") }
            }
            if let peak = Self.peakResidentMiB(of: process.pid) { figures[.peakRSS] = peak }
            try await timed(.close, into: &figures) { try await session.requestOK("close") }
            _ = process.write(line: "quit")
            let status = try await process.wait(timeout: .seconds(workload.stepTimeoutSeconds))
            guard status == .exited(0) else {
                throw VirtError(
                    .testbedFailure, "\(label): the server ended with \(status) after quit\(await session.errorTail(ended: true))")
            }
            try? FileManager.default.removeItem(atPath: files.back)
            return figures
        } catch {
            process.signal(SIGTERM)
            _ = try? await process.wait(timeout: .seconds(120))
            throw error
        }
    }

    @discardableResult
    private func timed<T>(
        _ metric: Metric, into figures: inout [Metric: Double], _ body: () async throws -> T
    ) async throws -> T {
        let clock = ContinuousClock()
        let start = clock.now
        let value = try await body()
        figures[metric] = (clock.now - start).seconds
        return value
    }

    private func measure(_ body: () async throws -> Void) async throws -> Double {
        let clock = ContinuousClock()
        let start = clock.now
        try await body()
        return (clock.now - start).seconds
    }

    /// Where an auxverb's stdin comes from or its stdout goes.
    enum Stream {
        case none
        case file(String)
    }

    private func check(_ argv: [String], input: Stream = .none, output: Stream = .none) async throws {
        let stdin: CommandInput
        switch input {
        case .none: stdin = .none
        case .file(let path): stdin = .fileDescriptor(try Self.openFile(path, flags: O_RDONLY), closeAfterStart: true)
        }
        let stdout: CommandOutput
        switch output {
        case .none: stdout = .capture(limit: 1 << 16)
        case .file(let path):
            stdout = .fileDescriptor(
                try Self.openFile(path, flags: O_WRONLY | O_CREAT | O_TRUNC), closeAfterStart: true)
        }
        let result = try await runner.run(
            Command(argv: argv), input: stdin, output: stdout, error: .capture(limit: 1 << 16))
        guard result.status == .exited(0) else {
            throw VirtError(
                .commandFailed, "\(label): \(Command(argv: argv)) ended with \(result.status): \(result.errorText)")
        }
    }

    private func verifySame(_ expected: String, _ actual: String, what: String) async throws {
        try await Verification.same(expected, actual, what: "\(label): \(what)", runner: runner)
    }

    private static func openFile(_ path: String, flags: Int32) throws(VirtError) -> Int32 {
        let fd = Glibc.open(path, flags | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw VirtError(.io, "cannot open \(path)", errno: errno) }
        return fd
    }

    /// The program's path: as given when it has a slash, otherwise looked up on PATH, as
    /// autopkgtest does with a server name.
    static func resolve(_ program: String) throws(VirtError) -> String {
        if program.contains("/") { return program }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for directory in path.split(separator: ":") where access("\(directory)/\(program)", X_OK) == 0 {
            return "\(directory)/\(program)"
        }
        throw VirtError(.notFound, "\(program) is not on PATH")
    }

    /// The kernel's high-water mark of the process's resident memory (VmHWM), in MiB.
    static func peakResidentMiB(of pid: pid_t) -> Double? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            if words.count >= 2, let kilobytes = Double(words[1]) { return kilobytes / 1024 }
        }
        return nil
    }
}

/// The protocol conversation of one repetition, every step under the step timeout.
struct Session: Sendable {
    let process: ServerProcess
    let timeout: Duration
    let label: String

    /// The server's last stderr lines, for messages: all of them when it has ended (its stdout
    /// did), what came so far when it hangs.
    func errorTail(ended: Bool) async -> String {
        let text = ended ? await process.standardErrorAtEnd() : process.standardError
        let lines = text.split(separator: "\n").suffix(15)
        return lines.isEmpty ? "" : "; its stderr ended with:\n" + lines.joined(separator: "\n")
    }

    func step<T: Sendable>(_ what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        do {
            return try await withTimeout(timeout, "\(label): \(what)", body)
        } catch {
            guard error.code == .timeout else { throw error }
            throw VirtError(.timeout, error.message + (await errorTail(ended: false)))
        }
    }

    func expectLine(_ expected: String) async throws {
        let line = try await process.readLine(timeout: timeout)
        guard line == expected else {
            throw VirtError(
                .protocolMisuse,
                "\(label): expected `\(expected)`, got `\(line ?? "end of output")`\(await errorTail(ended: line == nil))")
        }
    }

    /// Sends the verb with its arguments percent-encoded and returns the reply; anything but
    /// `ok ...` is an error.
    func request(_ verb: String, _ arguments: [String] = []) async throws -> String {
        let line = ([verb] + arguments.map(PercentCoding.encode)).joined(separator: " ")
        let reply = try await step(verb) { [process, timeout] in
            _ = process.write(line: line)
            return try await process.readLine(timeout: timeout)
        }
        guard let reply, reply == "ok" || reply.hasPrefix("ok ") else {
            throw VirtError(
                .testbedFailure,
                "\(label): `\(line)` got `\(reply ?? "end of output")`\(await errorTail(ended: reply == nil))")
        }
        return reply
    }

    /// A request whose only good reply is a bare `ok`.
    func requestOK(_ verb: String, _ arguments: String...) async throws {
        let reply = try await request(verb, arguments)
        guard reply == "ok" else {
            throw VirtError(.testbedFailure, "\(label): `\(verb)` got `\(reply)`\(await errorTail(ended: false))")
        }
    }

    /// The decoded word of an `ok WORD` reply (open's and revert's scratch directory).
    func requestWord(_ verb: String) async throws -> String {
        let words = try await request(verb).split(separator: " ")
        guard words.count >= 2 else { throw VirtError(.testbedFailure, "\(label): `\(verb)` gave no directory") }
        return PercentCoding.decode(Array(words[1].utf8))
    }
}
