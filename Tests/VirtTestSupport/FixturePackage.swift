import CommandRunner
import Foundation
import Testing

/// examples/fixture under real autopkgtest, as the backends' tests run it: its summary must be
/// expected-summary (autopkgtest exits 4, as expected-failure fails on purpose), and the
/// artifact with an odd name must come back.
public enum FixturePackage {
    public static var directory: String { "\(TestPaths.repositoryRoot)/examples/fixture" }

    /// Runs autopkgtest with `options` on the fixture and `server` (an argv) after `--`, its
    /// summary and output in `work`; checks the outcome and returns autopkgtest's result (its
    /// stderr has the server's).
    public static func run(
        server: [String], options: [String] = [], environment: [String: String?] = [:], work: String
    ) async throws -> CommandResult {
        // --no-built-binaries: the fixture's tests need no package, and the offline images have
        // no apt lists for autopkgtest to install one with.
        let result = try await SubprocessRunner().run(
            Command(
                "autopkgtest",
                ["--no-built-binaries", "--summary-file=\(work)/summary", "--output-dir=\(work)/out"] + options
                    + ["\(directory)/", "--"] + server, environment: environment),
            input: .none, output: .discard, error: .capture(limit: 64 << 20))
        #expect(result.status == .exited(4), "autopkgtest: \(result.status)\n\(result.errorText.suffix(4000))")
        let summary = (try? String(contentsOfFile: "\(work)/summary", encoding: .utf8)) ?? ""
        let actual = summary.split(separator: "\n").map { $0.split(separator: " ").prefix(2).joined(separator: " ") }
        let expected = try String(contentsOfFile: "\(directory)/expected-summary", encoding: .utf8)
            .split(separator: "\n").map(String.init)
        #expect(actual == expected, "summary:\n\(summary)")
        #expect(
            FileManager.default.fileExists(atPath: "\(work)/out/artifacts/odd dir ü/file, with % and spaces"),
            "the artifact with an odd name was not copied up")
        return result
    }
}
