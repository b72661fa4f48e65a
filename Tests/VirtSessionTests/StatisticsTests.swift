import CommandRunner
import FixtureBackend
import Foundation
import TestbedCore
import Testing
import VirtCore
import VirtTestSupport

/// `--statistics-file`: the probe's reading, the file's peaks and atomic replacement, and the
/// controller writing it at every verb.
@Suite("Testbed statistics")
struct StatisticsTests {
    @Test("a VM's probe output reads as its memory in use (MemTotal - MemFree), root filesystem, CPUs and architecture")
    func virtualMachine() {
        let sample = ResourceProbe.parse(
            """
            meminfo MemTotal: 2000000
            meminfo MemFree: 1500000
            disk 4096 1000000 250000
            cpus 2
            architecture amd64
            """)
        #expect(
            sample
                == ResourceSample(
                    cpuCount: 2, architecture: "amd64", availableMemory: 2_000_000 * 1024, memory: 500_000 * 1024,
                    availableDiskSpace: 1_000_000 * 4096, diskSpace: 750_000 * 4096))
    }

    @Test("a container's memory is its cgroup's, with the kernel's peak; without a limit it may use the host's")
    func container() {
        let unlimited = ResourceProbe.parse(
            "cgroup max 52428800 104857600\nmeminfo MemTotal: 8000000\nmeminfo MemFree: 10\ndisk 4096 100 50\n")
        #expect(unlimited.availableMemory == 8_000_000 * 1024)
        #expect(unlimited.memory == 52_428_800 && unlimited.memoryPeak == 104_857_600)
        #expect(unlimited.diskSpace == 50 * 4096 && unlimited.cpuCount == nil && unlimited.architecture == nil)
        let limited = ResourceProbe.parse("cgroup 1073741824 5 -\nmeminfo MemTotal: 8000000\nmeminfo MemFree: 10\n")
        #expect(limited.availableMemory == 1_073_741_824 && limited.memory == 5 && limited.memoryPeak == nil)
        // cgroup v1 says "no limit" with a number near 2^63.
        let v1 = ResourceProbe.parse("cgroup 9223372036854771712 7 9\nmeminfo MemTotal: 8000000\nmeminfo MemFree: 10\n")
        #expect(v1.availableMemory == 8_000_000 * 1024 && v1.memory == 7 && v1.memoryPeak == 9)
    }

    @Test(
        "what a hostile testbed prints leaves the fields unknown, never wrong or a crash",
        arguments: [
            "", "garbage\n\n\u{0}", "disk 4096 10 20", "disk -1 10 5", "cpus 0", "cpus -3", "cpus x",
            "meminfo MemTotal: 99999999999999999999\nmeminfo MemFree: 1", "meminfo MemTotal: 10\nmeminfo MemFree: 20",
            "disk 18446744073709551615 18446744073709551615 0", "architecture ../../etc", "architecture AMD64",
            "architecture \(String(repeating: "a", count: 40))", "cgroup max x 1", "cgroup 1 2",
        ])
    func hostile(_ output: String) {
        #expect(ResourceProbe.parse(output) == ResourceSample())
    }

    @Test("the probe script reads this host when run here (dash, no testbed): every field")
    func probeOnHost() async throws {
        let sample = try await ResourceProbe.sample(InTestbed(auxverb: [], runner: SubprocessRunner()), full: true)
        #expect(sample.cpuCount ?? 0 >= 1, "\(sample)")
        let architecture = try await SubprocessRunner().check(Command("dpkg", ["--print-architecture"]))
        #expect(sample.architecture == architecture, "\(sample)")
        #expect(sample.memory ?? 0 > 0 && sample.memory ?? 0 <= sample.availableMemory ?? 0, "\(sample)")
        #expect(sample.diskSpace ?? 0 > 0 && sample.diskSpace ?? 0 <= sample.availableDiskSpace ?? 0, "\(sample)")
        let usage = try await ResourceProbe.sample(InTestbed(auxverb: [], runner: SubprocessRunner()), full: false)
        #expect(usage.cpuCount == nil && usage.architecture == nil && usage.memory != nil, "\(usage)")
    }

    @Test(
        "the file is whole JSON from the start (unknowns null), keeps the highest of every sample, and leaves no temporary file"
    )
    func file() async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-statistics.")
        defer { TestPaths.removeTree(directory) }
        let path = "\(directory)/s.json"
        let statistics = try StatisticsFile(path: path, backend: "qemu", image: "/images/a b.qcow2")
        let first = try StatisticsSession.read(path)
        #expect(first["backend"] as? String == "qemu" && first["image"] as? String == "/images/a b.qcow2")
        for key in ["cpu_count", "architecture", "available_memory", "memory", "available_disk_space", "disk_space"] {
            #expect(first[key] is NSNull, "\(key): \(first)")
        }
        #expect(await statistics.needsFullSample)
        await statistics.record(
            ResourceSample(
                cpuCount: 2, architecture: "amd64", availableMemory: 100, memory: 40, availableDiskSpace: 1000,
                diskSpace: 300, hostDiskSpace: 7))
        await statistics.record(ResourceSample(availableMemory: 100, memory: 20, memoryPeak: 60, diskSpace: 200))
        await statistics.record(ResourceSample(memory: 30, diskSpace: 500))
        await statistics.opened(after: .milliseconds(1500))
        await statistics.reverted(after: .milliseconds(250))
        await statistics.reverted(after: .seconds(1))
        #expect(await !statistics.needsFullSample)
        await statistics.write()
        let document = try StatisticsSession.read(path)
        func number(_ key: String) -> Double? { (document[key] as? NSNumber)?.doubleValue }
        #expect(number("cpu_count") == 2 && document["architecture"] as? String == "amd64")
        #expect(number("memory") == 60 && number("available_memory") == 100, "\(document)")
        #expect(number("disk_space") == 500 && number("available_disk_space") == 1000 && number("host_disk_space") == 7)
        func seconds(_ key: String) -> [Double]? { (document[key] as? [NSNumber])?.map(\.doubleValue) }
        #expect(seconds("open_seconds") == [1.5] && seconds("revert_seconds") == [0.25, 1], "\(document)")
        #expect(number("samples") == 3)
        #expect(TestPaths.contents(of: directory) == ["s.json"])
        // As any new file of the process: 0666 less the umask.
        let mask = umask(0o022)
        umask(mask)
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_mode & 0o777 == 0o666 & ~mask, "\(String(info.st_mode, radix: 8))")
    }

    @Test("a path that cannot be written fails at once, naming it and why")
    func unwritable() async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-statistics.")
        defer { TestPaths.removeTree(directory) }
        #expect(
            throws: VirtError(.unavailable, "cannot write the statistics file \(directory)/no/s.json", errno: ENOENT)
        ) {
            try StatisticsFile(path: "\(directory)/no/s.json", backend: "qemu", image: "i")
        }
        #expect(throws: VirtError(.io, "cannot replace the statistics file \(directory)", errno: EISDIR)) {
            try StatisticsFile(path: directory, backend: "qemu", image: "i")
        }
        #expect(throws: VirtError(.usage, "the statistics file \(directory)/ names a directory, not a file")) {
            try StatisticsFile(path: "\(directory)/", backend: "qemu", image: "i")
        }
        #expect(TestPaths.contents(of: directory).isEmpty)
    }

    @Test("the controller writes the file after open, revert and reboot and at close, with a last sample at close")
    func controller() async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        let directory = try TestPaths.makeTemporaryDirectory("dv-statistics.")
        defer {
            TestPaths.removeTree(parent)
            TestPaths.removeTree(directory)
        }
        let path = "\(directory)/s.json"
        let statistics = try StatisticsFile(path: path, backend: "fixture", image: "none")
        let options = try FixtureTestbed.Options(words: ["parent=\(parent)"])
        let controller = TestbedController(backend: FixtureTestbed(options: options), statistics: statistics)
        do {
            _ = try await controller.open()
            #expect((try StatisticsSession.read(path)["open_seconds"] as? [NSNumber])?.count == 1)
            _ = try await controller.revert()
            #expect((try StatisticsSession.read(path)["revert_seconds"] as? [NSNumber])?.count == 1)
            // Removed, so only a write after the reboot can make it again.
            try FileManager.default.removeItem(atPath: path)
            try await controller.reboot(prepareOnly: false)
            let rebooted = try StatisticsSession.read(path)
            let samples = (rebooted["samples"] as? NSNumber)?.intValue ?? 0
            try await controller.close()
            let closed = try StatisticsSession.read(path)
            #expect((closed["samples"] as? NSNumber)?.intValue ?? 0 > samples, "a last sample at close: \(closed)")
            #expect(closed["memory"] is NSNumber && closed["cpu_count"] is NSNumber, "\(closed)")
        } catch {
            await controller.shutdown()
            throw error
        }
        #expect(TestPaths.contents(of: directory) == ["s.json"])
    }
}
