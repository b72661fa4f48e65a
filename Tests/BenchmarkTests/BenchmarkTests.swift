import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import VirtBenchmark

@Suite("Benchmark figures and tables")
struct BenchmarkReportTests {
    @Test("median and nearest-rank p95 of small samples")
    func statistics() {
        #expect(Statistics.median([]) == nil)
        #expect(Statistics.median([3, 1, 2]) == 2)
        #expect(Statistics.median([4, 1, 3, 2]) == 2.5)
        let hundred = (1...100).map(Double.init)
        #expect(Statistics.percentile(hundred, 95) == 95)
        #expect(Statistics.percentile([5, 1], 95) == 5)
        #expect(Statistics.percentile([7], 95) == 7)
    }

    @Test("targets bound times from above and throughputs from below")
    func targets() throws {
        let open = try #require(Target.forBackend("qemu").first { $0.metric == .open })
        #expect(open.isMet(by: 0.08) && !open.isMet(by: 0.2))
        let stdout = try #require(Target.forBackend("qemu").first { $0.metric == .stdoutThroughput })
        #expect(stdout.isMet(by: 3.5) && !stdout.isMet(by: 2))
        #expect(Target.forBackend("incus").contains { $0.metric == .revert && $0.ratio == 0.2 })
        #expect(Target.forBackend("qemu").contains { $0.metric == .revert && $0.ratio == 0.05 })
        #expect(Target.forBackend("qemu-arm64").map(\.metric) == [.open, .revert])
        #expect(Target.forBackend("qemu-arm64").allSatisfy { $0.ratio == 0.02 })
        #expect(Target.forBackend("xen").isEmpty)
    }

    @Test("a comparison shows both medians, ours/theirs and whether each target is met")
    func comparison() {
        let ours = BenchmarkResult(
            label: "ours", server: ["a"], workload: Workload(),
            repetitions: [[.open: 1, .stdoutThroughput: 300], [.open: 3, .stdoutThroughput: 100]])
        let theirs = BenchmarkResult(
            label: "theirs", server: ["b"], workload: Workload(),
            repetitions: [[.open: 4, .stdoutThroughput: 50, .reboot: 9]])
        #expect(ours.median(.open) == 2)
        let table = Report.comparison(ours: ours, theirs: theirs, targets: Target.forBackend("qemu"), style: .markdown)
        let rows = table.split(separator: "\n").map {
            $0.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
        }
        #expect(rows.contains(["open", "2.00", "4.00", "s", "0.500", "<= 0.100", "NO"]))
        #expect(rows.contains(["auxverb stdout", "200", "50.0", "MB/s", "4.00", ">= 3.00", "yes"]))
        #expect(rows.contains(["reboot", "-", "9.00", "s", "-", "", ""]))
        #expect(!rows.contains { $0.first == "revert" }, "metrics neither side has are left out")
    }

    @Test("a result survives JSON, with the workload, the machine and every repetition")
    func json() throws {
        var workload = Workload()
        workload.skipped = ["reboot"]
        let result = BenchmarkResult(
            label: "x", server: ["s", "--flag"], workload: workload, repetitions: [[.close: 0.25]])
        let back = try BenchmarkResult.decode(try result.encoded())
        #expect(back.workload == workload)
        #expect(back.repetitions == [["close_s": 0.25]])
        #expect(back.machine.cpus >= 1)
        #expect(back.date.hasSuffix("Z"))
    }

    @Test("verification fails on one changed byte, a missing file or an extra file, and passes on a true copy")
    func verification() async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-bench-test.")
        defer { TestPaths.removeTree(directory) }
        let runner = SubprocessRunner()
        try HostFiles.makeTree("\(directory)/a", count: 120)
        try #require(
            try await runner.run(Command("cp", ["-a", "\(directory)/a", "\(directory)/b"])).status == .exited(0))
        try await Verification.same("\(directory)/a", "\(directory)/b", what: "tree", runner: runner)

        let victim = "\(directory)/b/dir 1 – ünïcødé/-file 110 ✓ naïve.txt"
        var bytes = try #require(FileManager.default.contents(atPath: victim))
        bytes[0] ^= 1
        try bytes.write(to: URL(fileURLWithPath: victim))
        let changed = await #expect(throws: VirtError.self) {
            try await Verification.same("\(directory)/a", "\(directory)/b", what: "tree", runner: runner)
        }
        #expect(changed?.code == .copyFailed)
        #expect(changed?.message.contains("file 110") == true)

        try FileManager.default.removeItem(atPath: victim)
        await #expect(throws: VirtError.self) {
            try await Verification.same("\(directory)/a", "\(directory)/b", what: "tree", runner: runner)
        }

        try HostFiles.writeRandom("\(directory)/f", bytes: 100_000)
        try #require(try await runner.run(Command("cp", ["\(directory)/f", "\(directory)/g"])).status == .exited(0))
        try await Verification.same("\(directory)/f", "\(directory)/g", what: "file", runner: runner)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(directory)/g"))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data([0]))
        try handle.close()
        await #expect(throws: VirtError.self) {
            try await Verification.same("\(directory)/f", "\(directory)/g", what: "file", runner: runner)
        }
    }
}

/// The harness run for real against our servers with a small workload: it must not rot. The
/// figures are not judged here; scripts/benchmark is where they are compared.
@Suite("Benchmark smoke runs against our servers", .serialized)
struct BenchmarkSmokeTests {
    static let incusImage = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_INCUS_IMAGE"]
    static let imageDirectory = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_IMAGES"]

    let runner = SubprocessRunner()

    /// Runs virt-bench with a small workload and returns the result it wrote.
    func smokeRun(_ server: [String], label: String, extra: [String] = []) async throws -> BenchmarkResult {
        let directory = try TestPaths.makeTemporaryDirectory("dv-bench-smoke.")
        defer { TestPaths.removeTree(directory) }
        let json = "\(directory)/result.json"
        let result = try await runner.run(
            Command(
                TestPaths.executable("virt-bench"),
                [
                    "run", "--label", label, "--repetitions", "1", "--calls", "5", "--stream-mib", "4",
                    "--copy-mib", "4", "--files", "40", "--step-timeout", "900", "--json", json,
                    "--work-dir", directory,
                ] + extra + ["--"] + server),
            input: .none, output: .capture, error: .capture(limit: 4 << 20))
        try #require(result.status == .exited(0), "virt-bench failed:\n\(result.errorText)")
        #expect(result.outputText.contains("auxverb `true`, p95"), "the table is printed")
        return try BenchmarkResult.decode(try Data(contentsOf: URL(fileURLWithPath: json)))
    }

    func expectEveryMetric(_ result: BenchmarkResult, except missing: Set<Metric> = []) {
        for metric in Metric.allCases where !missing.contains(metric) {
            let value = result.median(metric)
            #expect((value ?? 0) > 0, "\(metric.rawValue) was measured")
        }
    }

    @Test("the fixture server: every figure, JSON with the workload; --skip leaves reboot out")
    func fixture() async throws {
        let result = try await smokeRun(
            [TestPaths.executable("virt-fixture-server")], label: "fixture", extra: ["--skip", "reboot"])
        expectEveryMetric(result, except: [.reboot])
        #expect(result.median(.reboot) == nil)
        #expect(result.workload.treeFiles == 40 && result.workload.streamBytes == 4 << 20)
    }

    @Test("a server that cannot open fails the run with its own message, and is not left running")
    func failingServer() async throws {
        let result = try await runner.run(
            Command(
                TestPaths.executable("virt-bench"),
                [
                    "run", "--label", "broken", "--", TestPaths.executable("virt-fixture-server"), "--fixture",
                    "fail-open=no disk here",
                ]))
        #expect(result.status == .exited(1))
        #expect(result.errorText.contains("no disk here"), "the server's stderr is quoted")
        #expect(result.outputText.isEmpty, "no table for a failed run")
        let left = try await runner.run(Command("pgrep", ["-f", "fail-open=no disk here"]))
        #expect(left.status == .exited(1), "no server left running")
    }

    @Test("bad arguments are usage errors before anything runs")
    func usage() async throws {
        for arguments in [["run", "--label", "x"], ["run", "--label", "x", "--skip", "open", "--", "true"]] {
            let result = try await runner.run(Command(TestPaths.executable("virt-bench"), arguments))
            #expect(result.status == .exited(2), "\(arguments)")
            #expect(result.errorText.contains("virt-bench: "), "\(arguments)")
        }
    }

    @Test(
        "debusine-virt-incus through a whole benchmark session",
        .enabled(if: incusImage != nil || TestPaths.isCI), .timeLimit(.minutes(10)))
    func incus() async throws {
        let image = try #require(Self.incusImage, "DEBUSINE_VIRT_INCUS_IMAGE is not set: run through scripts/test")
        expectEveryMetric(try await smokeRun([TestPaths.executable("debusine-virt-incus"), image], label: "incus"))
    }

    /// Without the reboot: under TCG it is a cold boot (about 45 CPU-seconds here), which the
    /// --baseimage session in QemuServerTests and the fixture runs give the server already, and
    /// the harness's reboot step runs in the Incus session above.
    @Test(
        "debusine-virt-qemu through a whole benchmark session but the reboot",
        .enabled(if: imageDirectory != nil || TestPaths.isCI), .guestSlot(minutes: 30))
    func qemu() async throws {
        let images = try #require(Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let result = try await smokeRun(
            [TestPaths.executable("debusine-virt-qemu"), "--boot-timeout", "900", "\(images)/bookworm-amd64.qcow2"],
            label: "qemu", extra: ["--skip", "reboot"])
        expectEveryMetric(result, except: [.reboot])
        #expect(result.median(.reboot) == nil)
    }
}
