import CommandRunner
import TestbedCore
import UnixSignals
import VirtCore

/// Process-level glue for the executables: stdio, signals and the exit status.
public enum VirtServer {
    /// The first thing every executable does: with SIGPIPE ignored a vanished reader is an EPIPE
    /// error we can clean up after, not a sudden death.
    public static func prepareProcess(program: String, debug: Bool) {
        signal(SIGPIPE, SIG_IGN)
        log.configure(program: program, debug: debug)
    }

    /// Serves the protocol on stdin/stdout for `backend` and ends the process.
    ///
    /// SIGTERM, SIGINT and SIGHUP at any moment destroy the testbed (concurrently with whatever
    /// the session is doing) and then kill the process with the same signal.
    ///
    /// With `cleanupAfterDeath`, a ``DeathWatch`` runs this executable with those arguments once
    /// the process is gone, however it went (SIGKILL cannot be caught).
    ///
    /// With `statistics`, the testbed's resources are sampled while it is open and written there.
    public static func serve(
        _ backend: any Testbed, runner: any CommandRunner = SubprocessRunner(), cleanupAfterDeath: [String]? = nil,
        statistics: StatisticsFile? = nil
    ) async -> Never {
        let flags = fcntl(0, F_GETFL)
        if flags >= 0 && flags & O_NONBLOCK != 0 {
            // A non-blocking stdin reads as EOF and would be mistaken for the caller quitting.
            log.error("stdin to a virt server must not be non-blocking")
            exit(ExitStatus.sessionFailure)
        }
        if let cleanupAfterDeath { DeathWatch.start(arguments: cleanupAfterDeath) }
        let controller = TestbedController(backend: backend, runner: runner, statistics: statistics)
        let session = Session(controller: controller, output: FileDescriptorReplyWriter(fd: 1))
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint, .sighup)
        await withTaskGroup(of: SessionOutcome.self) { group in
            group.addTask { await session.run(LineReader.lines(fd: 0)) }
            group.addTask {
                for await caught in signals {
                    log.info("caught \(caught), cleaning up")
                    return .signal(caught.rawValue)
                }
                return .signal(SIGTERM)
            }
            let outcome = await group.next() ?? .exit(ExitStatus.internalFailure)
            // A no-op when the session already cleaned up; after a signal, this is the cleanup.
            await controller.shutdown()
            finish(outcome)
        }
        // The group closure never returns: finish() ends the process.
        exit(ExitStatus.internalFailure)
    }

    /// Ends the process as `outcome` says: an exit status, or death by a signal.
    public static func finish(_ outcome: SessionOutcome) -> Never {
        switch outcome {
        case .exit(let status):
            exit(status)
        case .signal(let number):
            signal(number, SIG_DFL)
            var set = sigset_t()
            sigemptyset(&set)
            sigaddset(&set, number)
            sigprocmask(SIG_UNBLOCK, &set, nil)
            raise(number)
            _exit(128 + number)
        }
    }

    /// debusine-virt-auxverb, installed next to this server's executable: the program
    /// print-execute-command names.
    public static func auxverbExecutable(besides program: String) throws(VirtError) -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else { throw VirtError(.internalError, "cannot find my own executable") }
        let own = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let path = String(own[..<(own.lastIndex(of: "/") ?? own.startIndex)]) + "/debusine-virt-auxverb"
        guard access(path, X_OK) == 0 else {
            throw VirtError(.notFound, "\(path) is missing: install debusine-virt-auxverb next to \(program)")
        }
        guard !path.contains(","), !path.contains("%") else {
            // autopkgtest splits the auxverb on commas after percent-decoding.
            throw VirtError(.unavailable, "install debusine-virt in a path without `,' or `%' (now \(path))")
        }
        return path
    }

    /// Reports an error that happens before the banner and exits with its status.
    public static func failBeforeBanner(_ error: VirtError) -> Never {
        log.error(error.message)
        exit(ExitStatus.beforeBanner(error))
    }
}
