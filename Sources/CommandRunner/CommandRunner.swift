import VirtCore

/// Where a command's standard input comes from.
public enum CommandInput: Sendable {
    /// An empty stdin: the command sees end of file at once.
    case none
    /// These bytes, then end of file.
    case bytes([UInt8])
    /// A file descriptor of ours; closed in this process once the command has started when
    /// `closeAfterStart` is true (needed for pipes, or the reader never sees end of file).
    case fileDescriptor(Int32, closeAfterStart: Bool)
}

/// Where a command's standard output or standard error goes.
public enum CommandOutput: Sendable {
    /// Thrown away.
    case discard
    /// Collected into ``CommandResult``, failing if it exceeds `limit` bytes.
    case capture(limit: Int)
    /// Our own stderr: for output that is diagnostics. Never our stdout, which is the protocol's.
    case standardError
    /// A file descriptor of ours, closed here after the start when `closeAfterStart` is true.
    case fileDescriptor(Int32, closeAfterStart: Bool)

    /// Collects up to 1 MiB, enough for any command whose output we parse.
    public static let capture = CommandOutput.capture(limit: 1 << 20)
}

/// How a process ended.
public enum ProcessStatus: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    public var succeeded: Bool { self == .exited(0) }

    public var description: String {
        switch self {
        case .exited(let code): return "exit status \(code)"
        case .signaled(let signal): return "killed by signal \(signal)"
        }
    }
}

/// What a finished command left behind.
public struct CommandResult: Sendable, Equatable {
    public var status: ProcessStatus
    /// Captured stdout; empty unless ``CommandOutput/capture(limit:)`` was asked for.
    public var standardOutput: [UInt8]
    /// Captured stderr; empty unless ``CommandOutput/capture(limit:)`` was asked for.
    public var standardError: [UInt8]

    public init(status: ProcessStatus, standardOutput: [UInt8] = [], standardError: [UInt8] = []) {
        self.status = status
        self.standardOutput = standardOutput
        self.standardError = standardError
    }

    /// Captured stdout as text with one trailing newline removed.
    public var outputText: String { String(decoding: standardOutput, as: UTF8.self).trimmingFinalNewline() }
    /// Captured stderr as text with one trailing newline removed.
    public var errorText: String { String(decoding: standardError, as: UTF8.self).trimmingFinalNewline() }
}

extension String {
    func trimmingFinalNewline() -> String {
        hasSuffix("\n") ? String(dropLast()) : self
    }
}

/// The one seam through which every external command runs.
///
/// Cancelling the calling task stops the command (SIGTERM, then SIGKILL).
public protocol CommandRunner: Sendable {
    func run(
        _ command: Command,
        input: CommandInput,
        output: CommandOutput,
        error: CommandOutput
    ) async throws(VirtError) -> CommandResult
}

extension CommandRunner {
    /// Runs a command with empty stdin, capturing stdout and stderr.
    public func run(_ command: Command, input: CommandInput = .none) async throws(VirtError) -> CommandResult {
        try await run(command, input: input, output: .capture, error: .capture)
    }

    /// Runs a command that must succeed and returns its stdout as text; a failure becomes a
    /// ``VirtError/Code/commandFailed`` error that quotes the command and its stderr.
    @discardableResult
    public func check(_ command: Command, input: CommandInput = .none) async throws(VirtError) -> String {
        let result = try await run(command, input: input)
        guard result.status.succeeded else {
            throw VirtError.failed(command, result)
        }
        return result.outputText
    }
}

extension VirtError {
    /// The error for a command that did not succeed, quoting its stderr.
    public static func failed(_ command: Command, _ result: CommandResult) -> VirtError {
        let stderr = result.errorText
        let detail = stderr.isEmpty ? "" : ": \(stderr)"
        return VirtError(.commandFailed, "`\(command)` failed (\(result.status))\(detail)")
    }
}
