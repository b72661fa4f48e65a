import GuestHelper
import NIOCore
import NIOPosix
import QemuMonitor
import VirtCore

extension AuxverbRelay {
    /// Serves until cancelled, carrying the VM's helper port: `guestPortPath` is the unix socket
    /// QEMU serves for it (`server=on`), connected once for the VM's life.
    public nonisolated func run(guestPortPath: String) async throws(VirtError) {
        try await run(guest: try await Self.connect(guestPortPath))
    }

    /// Connects to the guest port's socket, retrying for a few seconds: a socket file can exist
    /// a moment before its owner listens on it.
    public static func connect(_ path: String) async throws(VirtError) -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
        try await UnixConnector.connect(
            name: "the guest helper's port \(path)", timeout: .seconds(10), every: .milliseconds(20)
        ) {
            try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.recvAllocator, value: AuxverbRelay.bulkReads)
                .connect(
                    unixDomainSocketPath: path
                ) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
        }
    }
}
