import Foundation
import Subprocess
import SystemPackage
import VirtCore

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
            // swift-subprocess 1.0.2 traps (StandardInputWriter deinit, "FileDescriptor was not
            // closed") when a child exits without reading all of an array input, so stdin is
            // always a descriptor: /dev/null, or a pipe fed by a thread of ours.
            switch input {
            case .none:
                return try await run(
                    configuration, input: .fileDescriptor(Sink.devNull, closeAfterSpawningProcess: false),
                    output: output, error: error)
            case .bytes(let bytes):
                let readEnd = try BytesFeeder.start(bytes)
                return try await run(
                    configuration,
                    input: .fileDescriptor(FileDescriptor(rawValue: readEnd), closeAfterSpawningProcess: true),
                    output: output, error: error)
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

/// Writes bytes into a pipe from a thread of its own, so a child that never reads them cannot
/// block us; a child that exits early just makes the write fail.
enum BytesFeeder {
    /// Returns the read end for the child.
    static func start(_ bytes: [UInt8]) throws(VirtError) -> Int32 {
        guard let (readEnd, writeEnd) = SpawnHygiene.pipe() else {
            throw VirtError(.io, "cannot create a pipe", errno: errno)
        }
        let thread = Thread {
            // A child that exits unread must give us EPIPE, not kill us: SIGPIPE from write()
            // goes to the writing thread, so blocking it here is enough whatever the process does.
            var pipeSignal = sigset_t()
            sigemptyset(&pipeSignal)
            sigaddset(&pipeSignal, SIGPIPE)
            pthread_sigmask(SIG_BLOCK, &pipeSignal, nil)
            var offset = 0
            while offset < bytes.count {
                let written = bytes.withUnsafeBytes {
                    write(writeEnd, $0.baseAddress.map { $0 + offset }, $0.count - offset)
                }
                if written < 0 {
                    if errno == EINTR { continue }
                    break
                }
                offset += written
            }
            close(writeEnd)
        }
        thread.start()
        return readEnd
    }
}

extension ProcessStatus {
    init(_ status: TerminationStatus) {
        switch status {
        case .exited(let code): self = .exited(code)
        case .signaled(let signal): self = .signaled(signal)
        }
    }
}
