import Glibc
import GuestChannel
import VirtCore

/// The program autopkgtest and sbuild execute as the auxverb: runs one command in the testbed
/// through the server's relay socket, streaming stdin, stdout and stderr, and exits with the
/// command's status as the auxverb contract says (``CommandEnd/auxverbStatus``).
///
/// Plain threads and blocking I/O: it is started for every command, so it must start fast and
/// has exactly three streams to move.
public enum AuxverbClient {
    /// Runs `argv` and returns the exit status to end with. Failures of the auxverb itself
    /// (server gone, protocol error) are reported on stderr and give 255.
    public static func run(socketPath: String, argv: [String], terminal: Frame.TerminalSize? = nil) -> Int32 {
        guard !argv.isEmpty else { return fail("no command given") }
        return run(socketPath: socketPath, request: .spawn(argv: argv, terminal: terminal))
    }

    /// Writes one file of the testbed to stdout (``Frame/readFile(_:directory:)``, whose statuses
    /// it ends with).
    public static func readFile(socketPath: String, path: String) -> Int32 {
        run(socketPath: socketPath, request: .readFile(path))
    }

    static func run(socketPath: String, request: Frame) -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return fail("socket: \(errorText())") }
        guard let connected = UnixSocketAddress.with(socketPath, { connect(fd, $0, $1) }) else {
            return fail("socket path too long: \(socketPath)")
        }
        guard connected == 0 else {
            return fail("cannot reach the testbed at \(socketPath): \(errorText()) (has the virt server ended?)")
        }
        let signals = FrameStreams.blockForwardedSignals()
        let connection = FrameOutput(fd: fd)
        guard connection.send(request) else {
            return fail("the testbed went away")
        }
        let credit = StdinCredit()
        FrameStreams.startThread {
            FrameStreams.forwardSignals(signals) { connection.send(FrameStreams.kill($0)) }
        }
        FrameStreams.startThread { FrameStreams.pumpStandardInput(into: connection, chunk: 256 << 10, credit: credit) }
        // Every output frame handled, stdout and stderr alike, is credit for the relay to send more.
        let received = FrameStreams.receive(
            from: fd, bufferSize: 1 << 20, credit: credit, stdoutGone: { connection.send(FrameStreams.kill(SIGPIPE)) },
            afterOutput: { _, count in connection.send(.count(.credit, count)) })
        switch received {
        case .end(let end):
            if case .failed(let reason) = end { _ = fail(reason) }
            return end.auxverbStatus
        case .lost:
            return fail("the connection to the testbed was lost")
        case .protocolError(let error):
            return fail("protocol error from the server: \(error)")
        }
    }

    static func fail(_ message: String) -> Int32 { FrameStreams.fail(message) }

    static func errorText() -> String { FrameStreams.errorText() }
}
