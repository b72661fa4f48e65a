import CommandRunner
import VirtCore

/// Runs commands inside the testbed through its auxverb, the same way the clients do.
public struct InTestbed: Sendable {
    /// The argv prefix that runs a command in the testbed.
    public let auxverb: [String]
    public let runner: any CommandRunner

    public init(auxverb: [String], runner: any CommandRunner) {
        self.auxverb = auxverb
        self.runner = runner
    }

    /// The host command that runs `argv` in the testbed.
    public func command(_ argv: [String]) -> Command { Command(argv: auxverb + argv) }

    public func run(
        _ argv: [String],
        input: CommandInput = .none,
        output: CommandOutput = .capture,
        error: CommandOutput = .capture
    ) async throws(VirtError) -> CommandResult {
        try await runner.run(command(argv), input: input, output: output, error: error)
    }

    /// Runs `argv` in the testbed; it must succeed. Returns its stdout without the final newline.
    @discardableResult
    public func check(_ argv: [String], input: CommandInput = .none) async throws(VirtError) -> String {
        try await runner.check(command(argv), input: input)
    }

    /// Runs a fixed shell script in the testbed with `arguments` as its positional parameters,
    /// so no caller-supplied text is ever spliced into shell code.
    @discardableResult
    public func script(_ script: String, _ arguments: [String] = []) async throws(VirtError) -> String {
        try await check(["/bin/sh", "-ec", script, "sh"] + arguments)
    }
}
