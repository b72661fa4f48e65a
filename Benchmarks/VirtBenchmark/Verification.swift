import CommandRunner
import Foundation
import VirtCore

/// Byte-for-byte comparison of what went into a testbed and what came back.
enum Verification {
    /// Compares two files with `cmp`, or two trees with `diff -r` (contents, names, symlinks);
    /// any difference is a ``VirtError/Code/copyFailed`` error naming `what`.
    static func same(_ expected: String, _ actual: String, what: String, runner: any CommandRunner) async throws {
        var isDirectory: ObjCBool = false
        _ = FileManager.default.fileExists(atPath: expected, isDirectory: &isDirectory)
        let command =
            isDirectory.boolValue
            ? Command("diff", ["-r", "--no-dereference", "-q", "--", expected, actual])
            : Command("cmp", ["--", expected, actual])
        let result = try await runner.run(command)
        guard result.status == .exited(0) else {
            let detail = [result.outputText, result.errorText].filter { !$0.isEmpty }.joined(separator: "; ")
            throw VirtError(.copyFailed, "\(what) differ from the original: \(detail)")
        }
    }
}
