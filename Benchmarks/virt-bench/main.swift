import ArgumentParser
import Foundation
import VirtBenchmark
import VirtCore

/// Times any autopkgtest virt server over the protocol, and compares two servers' results.
@main
struct VirtBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virt-bench",
        abstract: "Benchmark autopkgtest virt servers over the virt-server protocol.",
        subcommands: [Run.self, Compare.self, Show.self]
    )
}

/// Failures print one line on stderr and exit non-zero, like the servers.
func reportingErrors(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as VirtError {
        log.error(error.message)
        throw ExitCode(error.code == .usage ? 2 : 1)
    }
}

func load(_ path: String) throws -> BenchmarkResult {
    do {
        return try BenchmarkResult.decode(try Data(contentsOf: URL(fileURLWithPath: path)))
    } catch {
        throw VirtError(.io, "cannot read the result \(path): \(error)")
    }
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a server through whole sessions and time each part.",
        discussion: """
            Each repetition starts the server, opens a testbed, runs `true` through the auxverb \
            N times, streams bytes through the auxverb's stdin and stdout, copies a file and a \
            tree of files down and up (verified byte for byte), reverts and reboots when the \
            server can, closes and quits. The figures are printed as a table; --json writes them \
            with the medians, the date and the machine.
            """
    )

    @Option(help: "A name for this server in tables.")
    var label: String

    @Option(help: "Whole sessions to run; medians are reported.")
    var repetitions = 3

    @Option(help: "Auxverb calls of `true` per session.")
    var calls = 50

    @Option(name: .customLong("stream-mib"), help: "MiB streamed through the auxverb's stdin and stdout.")
    var streamMiB = 256

    @Option(name: .customLong("copy-mib"), help: "MiB of the one file copied down and up.")
    var copyMiB = 256

    @Option(help: "Files in the tree copied down and up.")
    var files = 2000

    @Option(name: .customLong("step-timeout"), help: "Seconds any one step may take before the run fails.")
    var stepTimeout = 1800

    @Option(
        name: .customLong("skip"),
        help: "Do not exercise this capability (revert or reboot) even when the server has it; repeatable.")
    var skipped: [String] = []

    @Option(help: "Write the result as JSON to this file.")
    var json: String?

    @Option(name: .customLong("work-dir"), help: "Where to make the host files (default: TMPDIR or /tmp).")
    var workDirectory: String?

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Argument(parsing: .postTerminator, help: "The server's command line, after `--`.")
    var server: [String] = []

    func run() async throws {
        log.configure(program: "virt-bench", debug: debug)
        try await reportingErrors {
            guard !server.isEmpty else { throw VirtError(.usage, "give the server's command line after --") }
            guard repetitions >= 1, calls >= 1, streamMiB >= 1, copyMiB >= 1, files >= 1, stepTimeout >= 1 else {
                throw VirtError(
                    .usage,
                    "--repetitions, --calls, --stream-mib, --copy-mib, --files and --step-timeout must be positive")
            }
            if let unknown = skipped.first(where: { !["revert", "reboot"].contains($0) }) {
                throw VirtError(.usage, "--skip takes revert or reboot, not `\(unknown)`")
            }
            var workload = Workload()
            workload.skipped = skipped
            workload.repetitions = repetitions
            workload.auxverbCalls = calls
            workload.streamBytes = streamMiB << 20
            workload.copyBytes = copyMiB << 20
            workload.treeFiles = files
            workload.stepTimeoutSeconds = stepTimeout
            let runner = BenchmarkRunner(
                label: label, server: server, workload: workload,
                workParent: workDirectory ?? PrivateDirectory.temporaryParent)
            let result = try await runner.run()
            if let json {
                do {
                    try result.encoded().write(to: URL(fileURLWithPath: json))
                } catch {
                    throw VirtError(.io, "cannot write \(json): \(error)")
                }
            }
            print(Report.table(result, style: .text), terminator: "")
        }
    }
}

struct Compare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print two results side by side with ours/theirs ratios.")

    @Option(help: "Check the ratios against the targets for this pair (qemu, qemu-arm64 or incus).")
    var targets: String?

    @Flag(help: "Print a Markdown table, after a list of what was compared.")
    var markdown = false

    @Argument(help: "Our result (JSON from `run --json`).")
    var ours: String

    @Argument(help: "The reference server's result.")
    var theirs: String

    func run() async throws {
        log.configure(program: "virt-bench", debug: false)
        try await reportingErrors {
            let targetList = targets.map(Target.forBackend) ?? []
            if let targets, targetList.isEmpty {
                throw VirtError(.usage, "no targets for `\(targets)`: use qemu or incus")
            }
            let mine = try load(ours)
            let other = try load(theirs)
            var same = other.workload
            same.skipped = mine.workload.skipped
            if mine.workload != same {
                log.warning("the two results ran different workloads; their ratios mean little")
            }
            if markdown { print(Report.comparisonPreamble(ours: mine, theirs: other), terminator: "") }
            print(
                Report.comparison(ours: mine, theirs: other, targets: targetList, style: markdown ? .markdown : .text),
                terminator: "")
        }
    }
}

struct Show: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print a result as a table.")

    @Flag(help: "Print a Markdown table.")
    var markdown = false

    @Argument(help: "A result (JSON from `run --json`).")
    var result: String

    func run() async throws {
        log.configure(program: "virt-bench", debug: false)
        try await reportingErrors {
            let loaded = try load(result)
            print("\(loaded.label): \(loaded.date), \(loaded.machine.summary)")
            print(Report.table(loaded, style: markdown ? .markdown : .text), terminator: "")
        }
    }
}
