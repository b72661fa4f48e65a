import TestbedCore
import VirtCore
import VirtProtocol

/// How a session ended, for the process to turn into its exit.
public enum SessionOutcome: Sendable, Equatable {
    case exit(Int32)
    /// The process must die by this signal (after cleanup), as upstream does.
    case signal(Int32)
}

/// The request loop: reads request lines, runs each verb on the ``TestbedController``, writes
/// replies. It owns no stdio: lines come from any async sequence and replies go to a
/// ``ReplyWriter``, so tests replay transcripts in-process and the executables use stdin/stdout.
public struct Session: Sendable {
    public let controller: TestbedController
    public let output: any ReplyWriter

    public init(controller: TestbedController, output: any ReplyWriter) {
        self.controller = controller
        self.output = output
    }

    /// Writes the banner, serves requests until `quit`, misuse or end of input, cleans up,
    /// and says how the process should end.
    public func run<Lines: AsyncSequence & Sendable>(
        _ lines: Lines
    ) async -> SessionOutcome where Lines.Element == LineReader.Event {
        do {
            try output.writeLine("ok")
        } catch {
            return await end(.signal(SIGPIPE), error.message)
        }
        do {
            for try await event in lines {
                let line: [UInt8]
                switch event {
                case .line(let bytes): line = bytes
                case .tooLong:
                    return await end(
                        .exit(ExitStatus.sessionFailure),
                        "request line longer than \(LineReader.maximumLineLength) bytes")
                case .readError(let reason):
                    return await end(.exit(ExitStatus.sessionFailure), "cannot read requests: \(reason)")
                }
                if let outcome = await handle(line) { return outcome }
            }
        } catch {
            return await end(.exit(ExitStatus.internalFailure), "reading requests failed: \(error)")
        }
        return await end(.exit(ExitStatus.sessionFailure), "end of file - caller quit?")
    }

    /// Runs one request; returns an outcome when the session is over.
    func handle(_ line: [UInt8]) async -> SessionOutcome? {
        let request: Request
        do {
            request = try Request.parse(line)
        } catch {
            return await end(.exit(ExitStatus.inSession(error)), error.message)
        }
        log.debug("request: \(String(decoding: line, as: UTF8.self))")
        let reply: Reply?
        do {
            reply = try await perform(request)
        } catch {
            return await end(.exit(ExitStatus.inSession(error)), error.message)
        }
        guard let reply else {
            // quit: nothing may be written, the client may have closed its end already.
            return await end(.exit(0), nil)
        }
        do {
            try output.writeLine(reply.line)
        } catch {
            return await end(.signal(SIGPIPE), "the client went away: \(error.message)")
        }
        return nil
    }

    /// The verb's reply, or nil for `quit`.
    func perform(_ request: Request) async throws(VirtError) -> Reply? {
        let arguments = request.arguments
        switch request.verb {
        case .capabilities:
            return .ok(await controller.capabilities())
        case .open:
            return .ok([try await controller.open()])
        case .close:
            try await controller.close()
            return .ok([])
        case .revert:
            return .ok([try await controller.revert()])
        case .reboot:
            try await controller.reboot(prepareOnly: arguments.first == "prepare-only")
            return .ok([])
        case .printExecuteCommand:
            let argv = try await controller.executeCommand()
            if let bad = argv.first(where: { $0.contains(",") || $0.contains("%") }) {
                // autopkgtest decodes the reply word twice and splits on commas in between.
                throw VirtError(.internalError, "auxverb element \(bad) contains `,' or `%'")
            }
            return .ok([Reply.executeCommandWord(argv)])
        case .copydown, .copyup:
            let direction: CopyRequest.Direction = request.verb == .copydown ? .down : .up
            let copy = try CopyRequest.fromProtocol(direction, source: arguments[0], destination: arguments[1])
            switch try await controller.copy(copy) {
            case .copied: return .ok([])
            case .timedOut:
                log.error("\(request.verb.rawValue) timed out")
                return .timeout
            case .failed(let reason):
                log.error(reason)
                return .copyFailed
            }
        case .shell:
            try await controller.shell(directory: arguments[0], environment: Array(arguments.dropFirst()))
            return .ok([])
        case .auxverbDebugFail:
            if let report = await controller.debugFailureReport() { log.info(report) }
            return .ok([])
        case .quit:
            return nil
        }
    }

    /// Cleans up the testbed, reports `message` on stderr, and passes the outcome on.
    func end(_ outcome: SessionOutcome, _ message: String?) async -> SessionOutcome {
        await controller.shutdown()
        if let message { log.error(message) }
        return outcome
    }
}
