import CommandRunner
import VirtCore

/// Runs commands inside the testbed through its auxverb, the same way the clients do.
public struct InTestbed: Sendable {
    /// The argv prefix that runs a command in the testbed.
    public let auxverb: [String]
    public let runner: any CommandRunner
    /// The argv prefix that writes one file of the testbed (the path it is given) to stdout and
    /// ends with status 3 when root may execute it, where the backend has one that is cheaper
    /// than running `cat` through the auxverb.
    public let fileReader: [String]?

    public init(auxverb: [String], runner: any CommandRunner, fileReader: [String]? = nil) {
        self.auxverb = auxverb
        self.runner = runner
        self.fileReader = fileReader
    }

    /// This testbed, with `fileReader` for single-file copies out of it.
    public func readingFiles(with fileReader: [String]) -> InTestbed {
        InTestbed(auxverb: auxverb, runner: runner, fileReader: fileReader)
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
