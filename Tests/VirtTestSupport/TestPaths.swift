import Foundation
import VirtClient
import VirtCore

/// Where the tests find the repository and the built executables.
public enum TestPaths {
    /// The repository root, from this file's location (Tests/VirtTestSupport/TestPaths.swift).
    public static let repositoryRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    public static var transcripts: String { "\(repositoryRoot)/protocol-spec/transcripts" }

    /// The build products directory: where the test bundle itself lives.
    public static let productsDirectory: String = {
        let executable =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: executable).deletingLastPathComponent().path
    }()

    public static func executable(_ name: String) -> String { "\(productsDirectory)/\(name)" }

    /// Whether this is a CI run, where nothing may be skipped.
    public static var isCI: Bool { ProcessInfo.processInfo.environment["CI"] == "true" }

    /// A fresh private directory for one test; remove it with ``removeTree(_:)``.
    public static func makeTemporaryDirectory(_ prefix: String = "dv-test.") throws -> String {
        try PrivateDirectory.make(in: PrivateDirectory.temporaryParent, prefix: prefix)
    }

    public static func removeTree(_ path: String) {
        try? FileManager.default.removeItem(atPath: path)
    }

    /// Writes an executable (a script the test then runs) so that running it cannot fail with
    /// "Text file busy": a file this process wrote itself stays open for writing in any child
    /// that another test's thread forked meanwhile, until that child execs, and the kernel
    /// refuses to execute a file open for writing (the shell then silently runs the next one
    /// on PATH). `install` writes the executable in a process of its own instead.
    public static func writeExecutable(_ path: String, _ text: String) async throws {
        let draft = "\(path).draft"
        try Data(text.utf8).write(to: URL(fileURLWithPath: draft))
        defer { unlink(draft) }
        let install = try ServerProcess(["/usr/bin/install", "-m", "755", draft, path])
        let status = try await install.wait()
        guard status == .exited(0) else {
            throw VirtError(.io, "install \(path) ended with \(status): \(install.standardError)")
        }
    }

    /// The names in a directory (empty if it does not exist).
    public static func contents(of path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
    }
}
