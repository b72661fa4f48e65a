import CommandRunner
import Foundation
import Testing
import VirtCore

/// One `--statistics-file` session against a real server, the same for every backend: the file
/// is whole JSON after every verb, and what the test makes the testbed use (a process holding
/// 300 MiB, a 200 MiB file) shows in the peaks.
public enum StatisticsSession {
    static let mebibyte: Int = 1 << 20

    /// The file as a JSON object; it must always be one.
    public static func read(_ path: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        let object = try JSONSerialization.jsonObject(with: data)
        return try #require(object as? [String: Any], "not a JSON object: \(String(decoding: data, as: UTF8.self))")
    }

    static func number(_ document: [String: Any], _ key: String) -> Int? {
        (document[key] as? NSNumber)?.intValue
    }

    /// Reads the file until `done` holds for it (the server samples every few seconds).
    static func waitFor(
        _ path: String, _ what: String, timeout: Duration = .seconds(90), _ done: ([String: Any]) -> Bool
    ) async throws -> [String: Any] {
        let deadline = ContinuousClock.now + timeout
        while true {
            let document = try read(path)
            if done(document) { return document }
            guard ContinuousClock.now < deadline else {
                Issue.record("the statistics file never showed \(what): \(document)")
                return document
            }
            try await Task.sleep(for: .milliseconds(500))
        }
    }

    /// Runs the session on `server` (started with `--statistics-file path`, banner not yet
    /// read). `privateDisk`: the testbed's root filesystem is its own (a VM's disk), so a file
    /// written in it must raise `disk_space` by its size; a container's is the storage pool's,
    /// which every instance on it moves.
    public static func run(
        _ server: ServerProcess, path: String, backend: String, image: String, privateDisk: Bool,
        runner: any CommandRunner = SubprocessRunner()
    ) async throws {
        #expect(try await server.readLine() == "ok", "\(server.standardError)")
        // Written before the banner: a worker reading it early finds whole JSON, nothing measured.
        let first = try read(path)
        #expect(first["backend"] as? String == backend && first["image"] as? String == image, "\(first)")
        #expect((first["open_seconds"] as? [Any])?.isEmpty == true && first["memory"] is NSNull, "\(first)")

        let opened = try await server.request("open", timeout: .seconds(960))
        try #require(opened.hasPrefix("ok /"), "open failed:\n\(server.standardError)")
        let aux = try ProtocolWords.auxverb(fromReply: try await server.request("print-execute-command"))
        #expect((try read(path)["open_seconds"] as? [NSNumber])?.count == 1)
        let baseline = try await waitFor(path, "a first sample") { number($0, "samples") ?? 0 >= 1 }
        let memory0 = try #require(number(baseline, "memory"), "\(baseline)")
        let disk0 = try #require(number(baseline, "disk_space"), "\(baseline)")
        #expect(number(baseline, "cpu_count") ?? 0 >= 1, "\(baseline)")
        #expect(baseline["architecture"] as? String == "amd64", "\(baseline)")
        #expect(number(baseline, "available_memory") ?? 0 > memory0 && memory0 > 0, "\(baseline)")
        #expect(number(baseline, "available_disk_space") ?? 0 > disk0 && disk0 > 0, "\(baseline)")

        func inTestbed(_ argv: [String]) async throws {
            let result = try await runner.run(
                Command(argv: aux + argv), input: .none, output: .capture, error: .capture)
            #expect(result.status == .exited(0), "\(argv): \(result.status) \(result.errorText)")
        }
        // tail keeps all 300 MiB of a pipe before writing any; `sleep` never reads, so tail holds
        // them until sleep ends, or until the test has seen them (a VM's memory is sampled: a
        // loaded machine must not make the test miss them). No python3: container images may
        // have none.
        let hog = Task {
            try await runner.run(
                Command(argv: aux + ["sh", "-c", "head -c 300M /dev/zero | tail -c 300M | sleep 300"]),
                input: .none, output: .discard, error: .discard)
        }
        let held = try await waitFor(path, "300 MiB more memory in use", timeout: .seconds(240)) {
            number($0, "memory") ?? 0 >= memory0 + 280 * mebibyte
        }
        hog.cancel()
        _ = await hog.result
        #expect(number(held, "memory") ?? 0 >= memory0 + 280 * mebibyte, "from \(memory0): \(held)")

        try await inTestbed([
            "dd", "if=/dev/zero", "of=/var/tmp/statistics-fill", "bs=1M", "count=200", "conv=fsync", "status=none",
        ])
        let samples = number(try read(path), "samples") ?? 0
        let filled = try await waitFor(path, "two samples after the file was written") {
            number($0, "samples") ?? 0 >= samples + 2
        }
        let disk = number(filled, "disk_space") ?? 0
        if privateDisk {
            #expect(disk >= disk0 + 195 * mebibyte, "from \(disk0): \(filled)")
        } else {
            #expect(disk >= 200 * mebibyte && disk <= number(filled, "available_disk_space") ?? 0, "\(filled)")
        }

        #expect(try await server.request("revert", timeout: .seconds(960)).hasPrefix("ok /"), "\(server.standardError)")
        let reverted = try read(path)
        #expect((reverted["revert_seconds"] as? [NSNumber])?.count == 1, "\(reverted)")
        // Peaks are of the whole session: a revert does not forget them.
        #expect(number(reverted, "memory") ?? 0 >= memory0 + 280 * mebibyte, "\(reverted)")

        #expect(try await server.request("close", timeout: .seconds(120)) == "ok")
        let closed = try read(path)
        #expect(
            (closed["open_seconds"] as? [NSNumber])?.count == 1 && number(closed, "disk_space") ?? 0 >= disk,
            "\(closed)")
        server.write(line: "quit")
        #expect(try await server.wait(timeout: .seconds(120)) == .exited(0), "\(server.standardError)")
        // Only the file: no temporary file of its left beside it.
        let directory = (path as NSString).deletingLastPathComponent
        #expect(TestPaths.contents(of: directory) == [(path as NSString).lastPathComponent])
    }
}
