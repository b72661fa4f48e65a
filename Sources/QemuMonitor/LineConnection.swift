import NIOCore
import NIOExtras
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
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        var lastError = ""
        while true {
            let lines = Mailbox<[UInt8]>()
            let closedError = VirtError(.testbedFailure, "\(name): connection closed")
            let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            ByteToMessageHandler(LineBasedFrameDecoder(), maximumBufferSize: maximumLineLength))
                        try channel.pipeline.syncOperations.addHandler(
                            LineForwarder(lines: lines, closedError: closedError, name: name))
                    }
                }
            do {
                let channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
                log.debug("\(name): connected")
                return LineConnection(name: name, lines: lines, channel: channel)
            } catch let error as SocketAddressError {
                // A path over 108 bytes never starts working.
                throw VirtError(.io, "\(name): cannot connect: \(error)")
            } catch {
                lastError = "\(error)"
            }
            guard !Task.isCancelled else {
                throw VirtError(.timeout, "connecting to \(name) was cancelled")
            }
            guard clock.now.advanced(by: .milliseconds(50)) < deadline else {
                throw VirtError(
                    .timeout, "cannot connect to \(name) within \(timeout.formattedSeconds): \(lastError)")
            }
            do {
                try await Task.sleep(for: .milliseconds(50))
            } catch {
                throw VirtError(.timeout, "connecting to \(name) was cancelled")
            }
        }
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

/// Moves decoded lines from the event loop into the connection's queue.
private final class LineForwarder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let lines: Mailbox<[UInt8]>
    private let closedError: VirtError
    private let name: String

    init(lines: Mailbox<[UInt8]>, closedError: VirtError, name: String) {
        self.lines = lines
        self.closedError = closedError
        self.name = name
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        lines.push(buffer.readBytes(length: buffer.readableBytes) ?? [])
    }

    func channelInactive(context: ChannelHandlerContext) {
        log.debug("\(name): connection closed")
        lines.finish(throwing: closedError)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ECONNRESET when QEMU dies, or an unterminated last line: either way the peer is gone.
        log.debug("\(name): \(error)")
        lines.finish(throwing: closedError)
        context.close(promise: nil)
    }
}
