import VirtCore

/// Runs each command through another runner for at most `limit`, then stops it (cancellation:
/// SIGTERM, then SIGKILL) and throws a ``VirtError/Code/timeout`` error naming the command.
/// For the commands that ask a daemon something: one that stopped answering must not hold its
/// caller for good.
public struct TimeLimitedRunner: CommandRunner {
    public let base: any CommandRunner
    public let limit: Duration

    public init(_ base: any CommandRunner, limit: Duration) {
        self.base = base
        self.limit = limit
    }

    public func run(
        _ command: Command, input: CommandInput, output: CommandOutput, error: CommandOutput
    ) async throws(VirtError) -> CommandResult {
        let base = base
        return try await withTimeout(limit, "`\(command)`") {
            try await base.run(command, input: input, output: output, error: error)
        }
    }
}
