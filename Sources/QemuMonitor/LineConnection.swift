import NIOCore
import NIOPosix
import VirtCore

/// A unix-socket connection carrying newline-terminated lines, the framing of QMP and QGA.
///
/// Incoming lines are queued in ``lines`` as they arrive, so nothing read from the socket is lost
/// while no one is waiting. When the peer goes away the queue is finished with a
/// ``VirtError/Code/testbedFailure`` error ending in "connection closed", so waits fail promptly.
final class LineConnection: Sendable {
    /// The longest line accepted. The largest legitimate one is a `guest-exec-status` reply with
    /// 16 MiB of stdout and of stderr in base64 (about 45 MB); a guest sending more without a
    /// newline is treated as gone rather than allowed to exhaust the host's memory.
    static let maximumLineLength = 64 << 20

    /// Prefixes messages, e.g. "QMP /run/x/qmp.sock".
    let name: String
    /// Lines without their terminator (a trailing CR is dropped too: QMP ends lines with CRLF).
    let lines: Mailbox<[UInt8]>
    private let channel: any Channel

    private init(name: String, lines: Mailbox<[UInt8]>, channel: any Channel) {
        self.name = name
        self.lines = lines
        self.channel = channel
    }

    deinit {
        channel.close(promise: nil)
    }

    /// The error for anything attempted after the peer or we closed the connection.
    var closedError: VirtError { VirtError(.testbedFailure, "\(name): connection closed") }

    /// Connects to `path`, retrying while the socket does not exist yet or refuses connections:
    /// QEMU and the agent create their sockets some time after they start.
    static func connect(path: String, name: String, timeout: Duration) async throws(VirtError) -> LineConnection {
        let (channel, lines) = try await UnixConnector.connect(
            path: path, name: name, timeout: timeout, every: .milliseconds(50)
        ) { pipeline in
            try pipeline.addHandler(ByteToMessageHandler(LineDecoder(), maximumBufferSize: maximumLineLength))
        }
        return LineConnection(name: name, lines: lines, channel: channel)
    }

    /// Writes `bytes` (which must already end in a newline) and waits until the kernel has them.
    func send(_ bytes: [UInt8]) async throws(VirtError) {
        guard !lines.isFinished else { throw closedError }
        do {
            try await channel.writeAndFlush(ByteBuffer(bytes: bytes)).get()
        } catch ChannelError.ioOnClosedChannel {
            throw closedError
        } catch {
            throw VirtError(.testbedFailure, "\(name): cannot send: \(error); connection closed")
        }
    }

    /// Closes the socket; pending and later waits on ``lines`` fail with ``closedError``.
    ///
    /// A plain close, not a shutdown of the output first: NIO completes that only once pending
    /// writes are out, and QEMU stops reading the agent's socket while no agent reads the port,
    /// so a close that waited for it hung the boot wait for ever.
    func close() async {
        lines.finish(throwing: closedError)
        do {
            try await channel.close().get()
        } catch {
            // Already closed by the peer: nothing left to do.
        }
    }
}
