import Subprocess
import SystemPackage
import VirtCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Runs commands with swift-subprocess.
///
/// The child never inherits our stdin or stdout: stdin is always given explicitly and stdout is
/// captured, discarded or redirected, because stdout belongs to the protocol.
public struct SubprocessRunner: CommandRunner {
    /// How long a cancelled command gets between SIGTERM and SIGKILL.
    public var gracePeriod: Duration

    public init(gracePeriod: Duration = .seconds(2)) {
        self.gracePeriod = gracePeriod
    }

    public func run(
        _ command: Command,
        input: CommandInput,
        output: CommandOutput,
        error: CommandOutput
    ) async throws(VirtError) -> CommandResult {
        log.debug("run: \(command)")
        let configuration = configuration(for: command)
        do {
            switch input {
            case .none:
                return try await run(configuration, input: .array([]), output: output, error: error)
            case .bytes(let bytes):
                return try await run(configuration, input: .array(bytes), output: output, error: error)
            case .fileDescriptor(let fd, let close):
                return try await run(
                    configuration,
                    input: .fileDescriptor(FileDescriptor(rawValue: fd), closeAfterSpawningProcess: close),
                    output: output,
                    error: error
                )
            }
        } catch let error as VirtError {
            throw error
        } catch is CancellationError {
            throw VirtError(.timeout, "`\(command)` was cancelled")
        } catch {
            throw VirtError(.commandFailed, "cannot run `\(command)`: \(error)")
        }
    }

    private func configuration(for command: Command) -> Configuration {
        let executable: Executable =
            command.executable.contains("/")
            ? .path(FilePath(command.executable)) : .name(command.executable)
        var environment = Environment.inherit
        if !command.environment.isEmpty {
            var updates: [Environment.Key: String?] = [:]
            for (key, value) in command.environment {
                updates[Environment.Key(stringLiteral: key)] = value
            }
            environment = environment.updating(updates)
        }
        var options = PlatformOptions()
        options.createSession = command.newSession
        options.teardownSequence = [.gracefulShutDown(allowedDurationToNextStep: gracePeriod)]
        return Configuration(
            executable: executable,
            arguments: Arguments(command.arguments),
            environment: environment,
            workingDirectory: command.workingDirectory.map { FilePath($0) },
            platformOptions: options
        )
    }

    private func run<Input: InputProtocol>(
        _ configuration: Configuration,
        input: Input,
        output: CommandOutput,
        error: CommandOutput
    ) async throws -> CommandResult {
        switch (Sink(output), Sink(error)) {
        case (.bytes(let outLimit), .bytes(let errLimit)):
            let result = try await Subprocess.run(
                configuration, input: input, output: .bytes(limit: outLimit), error: .bytes(limit: errLimit))
            return CommandResult(
                status: ProcessStatus(result.terminationStatus), standardOutput: result.standardOutput,
                standardError: result.standardError)
        case (.bytes(let outLimit), .descriptor(let fd, let close)):
            let result = try await Subprocess.run(
                configuration, input: input, output: .bytes(limit: outLimit),
                error: .fileDescriptor(fd, closeAfterSpawningProcess: close))
            return CommandResult(
                status: ProcessStatus(result.terminationStatus), standardOutput: result.standardOutput)
        case (.descriptor(let fd, let close), .bytes(let errLimit)):
            let result = try await Subprocess.run(
                configuration, input: input, output: .fileDescriptor(fd, closeAfterSpawningProcess: close),
                error: .bytes(limit: errLimit))
            return CommandResult(
                status: ProcessStatus(result.terminationStatus), standardError: result.standardError)
        case (.descriptor(let outFD, let outClose), .descriptor(let errFD, let errClose)):
            let result = try await Subprocess.run(
                configuration, input: input, output: .fileDescriptor(outFD, closeAfterSpawningProcess: outClose),
                error: .fileDescriptor(errFD, closeAfterSpawningProcess: errClose))
            return CommandResult(status: ProcessStatus(result.terminationStatus))
        }
    }
}

/// CommandOutput reduced to the two kinds swift-subprocess needs: collect bytes, or a descriptor.
private enum Sink {
    case bytes(limit: Int)
    case descriptor(FileDescriptor, close: Bool)

    init(_ output: CommandOutput) {
        switch output {
        case .capture(let limit): self = .bytes(limit: limit)
        case .discard: self = .descriptor(Sink.devNull, close: false)
        case .standardError: self = .descriptor(.standardError, close: false)
        case .fileDescriptor(let fd, let close): self = .descriptor(FileDescriptor(rawValue: fd), close: close)
        }
    }

    /// One /dev/null for the process lifetime: opening it per command would cost a syscall pair
    /// and a descriptor to leak on every error path.
    static let devNull: FileDescriptor = {
        let fd = open("/dev/null", O_RDWR | O_CLOEXEC)
        return FileDescriptor(rawValue: fd >= 0 ? fd : 2)
    }()
}

extension ProcessStatus {
    init(_ status: TerminationStatus) {
        switch status {
        case .exited(let code): self = .exited(code)
        case .signaled(let signal): self = .signaled(signal)
        }
    }
}
