import NIOCore
import NIOPosix
import VirtCore

/// Connects to a unix socket that its owner may not listen on yet (QEMU and the guest agent make
/// their sockets some time after they start), retrying until a deadline.
public enum UnixConnector {
    /// Calls `attempt` every `interval` until it connects, for at most `timeout`. A path the
    /// kernel can never take (over 108 bytes) fails at once.
    public static func connect<T>(
        name: String, timeout: Duration, every interval: Duration, _ attempt: () async throws -> T
    ) async throws(VirtError) -> T {
        var lastError = "no attempt made"
        let connected = try await Deadline(after: timeout).poll(every: interval) { () async throws(VirtError) -> T? in
            do {
                return try await attempt()
            } catch let error as SocketAddressError {
                throw VirtError(.io, "\(name): cannot connect: \(error)")
            } catch {
                lastError = "\(error)"
                return nil
            }
        }
        if let connected { return connected }
        if Task.isCancelled { throw VirtError(.timeout, "connecting to \(name) was cancelled") }
        throw VirtError(.timeout, "cannot connect to \(name) within \(timeout.formattedSeconds): \(lastError)")
    }

    /// Connects a channel whose inbound bytes go to the queue returned with it, which is finished
    /// with a "connection closed" error naming `name` when the peer goes away. `framing`, if
    /// given, adds the handlers that frame the bytes first.
    static func connect(
        path: String, name: String, timeout: Duration, every interval: Duration,
        framing: (@Sendable (ChannelPipeline.SynchronousOperations) throws -> Void)? = nil
    ) async throws(VirtError) -> (channel: any Channel, bytes: Mailbox<[UInt8]>) {
        let closedError = VirtError(.testbedFailure, "\(name): connection closed")
        let connected = try await connect(name: name, timeout: timeout, every: interval) {
            // A queue per attempt: a failed attempt's handler may still end its own.
            let bytes = Mailbox<[UInt8]>()
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try framing?(channel.pipeline.syncOperations)
                        try channel.pipeline.syncOperations.addHandler(
                            ByteForwarder(into: bytes, closedError: closedError, name: name))
                    }
                }
                .connect(unixDomainSocketPath: path).get()
            return (channel, bytes)
        }
        log.debug("\(name): connected")
        return connected
    }
}

/// Moves what a channel reads from the event loop into a queue, and ends the queue when the
/// peer goes away.
final class ByteForwarder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let bytes: Mailbox<[UInt8]>
    private let closedError: VirtError
    private let name: String

    init(into bytes: Mailbox<[UInt8]>, closedError: VirtError, name: String) {
        self.bytes = bytes
        self.closedError = closedError
        self.name = name
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        bytes.push(buffer.readBytes(length: buffer.readableBytes) ?? [])
    }

    func channelInactive(context: ChannelHandlerContext) {
        log.debug("\(name): connection closed")
        bytes.finish(throwing: closedError)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ECONNRESET when QEMU dies, or an unterminated last line: either way the peer is gone.
        log.debug("\(name): \(error)")
        bytes.finish(throwing: closedError)
        context.close(promise: nil)
    }
}
