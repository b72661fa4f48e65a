import CommandRunner
import Foundation
import Synchronization
import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache

/// The real runner, restricted for tests: curl may only reach loopback or local files, never
/// through a proxy; and it counts the commands it runs, so a test can tell a cache hit (no curl,
/// no hashing) from a miss. Nothing is faked: every command really runs.
final class LoopbackRunner: CommandRunner {
    private let real = SubprocessRunner()
    private let counts = Mutex<[String: Int]>([:])

    func count(_ executable: String) -> Int { counts.withLock { $0[executable] ?? 0 } }
    /// Files hashed, by whichever command did it.
    var hashes: Int { count(CacheCommands.openssl.executable) + count(CacheCommands.sha256sum.executable) }

    func run(
        _ command: Command, input: CommandInput, output: CommandOutput, error: CommandOutput
    ) async throws(VirtError) -> CommandResult {
        var command = command
        if command.executable == "curl" {
            let url = command.arguments.last ?? ""
            guard url.hasPrefix("http://127.0.0.1:") || url.hasPrefix("file:///") else {
                Issue.record("a test tried to download \(url), which is not on the loopback interface")
                throw VirtError(.internalError, "refusing to download \(url) in a test")
            }
            for name in ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
                command.environment[name] = .some(nil)
            }
        }
        counts.withLock { $0[command.executable, default: 0] += 1 }
        return try await real.run(command, input: input, output: output, error: error)
    }
}
