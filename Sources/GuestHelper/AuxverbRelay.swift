import GuestChannel
import NIOCore
import NIOPosix
import Synchronization
import VirtCore

/// The server side of the auxverb: serves auxverb clients on a unix socket in the instance
/// directory and relays their frames to the guest helper over one stream (the virtio-serial
/// port's chardev socket), giving each command its own channel id.
///
/// Each client gets its own outgoing queue, so a client that reads slowly holds up nobody else;
/// the credit window bounds what any queue can hold. The relay enforces that window itself: the
/// guest end is not trusted (a root test can replace the helper), and a guest that sends more
/// than it was granted has its channel dropped rather than filling the host's memory.
public actor AuxverbRelay {
    public nonisolated let socketPath: String
    private var guest: NIOAsyncChannelOutboundWriter<ByteBuffer>?
    private var guestLost = false
    /// Counts the guest streams attached: the end of one that was replaced (a late end, after
    /// the next was attached) must not touch the next one's state.
    private var generation = 0
    private var clients: [UInt32: AsyncStream<Frame>.Continuation] = [:]
    /// Per command: the output bytes the guest may still send (its window plus the client's
    /// credits, less what it sent), and the stdin bytes it has not acknowledged yet.
    private var allowances: [UInt32: (output: Int, stdin: Int)] = [:]
    private var nextChannel: UInt32 = 1
    /// Whether ``serve()`` has its socket bound: a hello alone does not make the auxverb usable,
    /// since the stream is carried beside the serving. One serving per relay: nothing here tells
    /// a later one's state from an earlier one's.
    private var listening = false
    /// Why ``serve()`` could not listen, or no longer does (it failed or ended uncancelled); nil
    /// while it serves, before it does, and once cancelled.
    public private(set) var listenFailure: String?
    /// The boot id the running helper reported in its hello; nil until one has.
    public private(set) var helperBootID: String?
    /// What the helper's last hello said after its boot id and version (after a restore: what it
    /// did about the clock and the random generator).
    public private(set) var helperStatus = ""
    /// The version the running helper announced in its hello.
    public private(set) var helperVersion: String?
    /// The version the helper must announce: this server's program.
    public nonisolated let expectedVersion: String

    public init(socketPath: String, expectedVersion: String = GuestHelperScript.version) {
        self.socketPath = socketPath
        self.expectedVersion = expectedVersion
    }

    /// Serves auxverb clients on ``socketPath`` and carries one guest stream, until cancelled:
    /// a VM's helper port, connected once for the VM's life.
    public nonisolated func run(guest: NIOAsyncChannel<ByteBuffer, ByteBuffer>) async throws(VirtError) {
        do {
            try await withThrowingDiscardingTaskGroup { tasks in
                tasks.addTask { await self.carry(guest) }
                try await self.serve()
            }
        } catch let error as VirtError {
            throw error
        } catch {
            throw VirtError(.testbedFailure, "the auxverb relay failed: \(error)")
        }
    }

    /// Serves auxverb clients on ``socketPath`` until cancelled. Their commands go to the guest
    /// stream being carried (``carry(_:)``); with none, they fail at once.
    public nonisolated func serve() async throws(VirtError) {
        var failure: String?
        do {
            try await serveConnections()
        } catch {
            if !(error is CancellationError), !Task.isCancelled {
                failure = Self.failed((error as? VirtError)?.message ?? "\(error)")
            }
        }
        await setListening(false, failure: failure)
        if let failure { throw VirtError(.testbedFailure, failure) }
    }

    /// Binds the socket and serves its connections; returns only when cancelled.
    private nonisolated func serveConnections() async throws {
        let untaken = UntakenConnections()
        let server: NIOAsyncChannel<NIOAsyncChannel<ByteBuffer, ByteBuffer>, Never>
        do {
            server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .childChannelOption(.recvAllocator, value: Self.bulkReads)
                .bind(
                    unixDomainSocketPath: socketPath, cleanupExistingSocketFile: true
                ) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let connection = try NIOAsyncChannel<ByteBuffer, ByteBuffer>(
                            wrappingChannelSynchronously: channel)
                        untaken.hold(connection)
                        return connection
                    }
                }
        } catch let error as IOError {
            throw VirtError(
                .testbedFailure, "cannot listen on \(socketPath): \(String(cString: strerror(error.errnoCode)))")
        }
        chmod(socketPath, 0o600)
        await setListening(true)
        var ended: (any Error)?
        do {
            try await withThrowingDiscardingTaskGroup { tasks in
                try await server.executeThenClose { connections in
                    for try await connection in connections {
                        untaken.release(connection)
                        tasks.addTask { await self.serve(connection) }
                    }
                }
                // No new client from here, while those connected finish (which can take hours):
                // a wait for the helper fails now, not once they have.
                await setListening(false, failure: Task.isCancelled ? nil : Self.failed(Self.stoppedServing))
            }
        } catch {
            ended = error
        }
        await untaken.finish(after: server.channel)
        if let ended { throw ended }
        if !Task.isCancelled { throw VirtError(.testbedFailure, Self.stoppedServing) }
    }

    /// How the relay's streams are read: NIO's default reads at most 64 KiB at a time, and every
    /// read costs a hop between the event loop and the tasks that route it; a stream of output
    /// fills much more than that between two reads.
    public static let bulkReads = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 64 << 10, maximum: 1 << 20)

    /// Why a relay whose serving ended uncancelled fails (its socket was closed under it).
    static let stoppedServing = "its socket stopped taking connections"

    /// ``listenFailure`` for `reason`.
    static func failed(_ reason: String) -> String { "the auxverb relay failed: \(reason)" }

    private func setListening(_ now: Bool, failure: String? = nil) {
        listening = now
        if let failure { listenFailure = failure }
    }

    /// Carries one guest stream until it closes (or is closed): frames from the helper at its
    /// end go to their commands' clients. Commands in flight fail when it ends. One stream at a
    /// time: an Incus instance's helper is carried again after a reboot or a revert.
    public nonisolated func carry(_ guest: NIOAsyncChannel<ByteBuffer, ByteBuffer>) async {
        var attached: Int?
        // Cancelled (its helper stopped), the stream closes now: reading it would otherwise wait
        // for its other end to close.
        let underlying = guest.channel
        do {
            try await withTaskCancellationHandler {
                try await carryStream(guest, attached: &attached)
            } onCancel: {
                underlying.close(promise: nil)
            }
        } catch {
            log.debug("guest channel: \(error)")
            if let attached {
                await self.guestClosed(nil, generation: attached)
            } else {
                await self.markLost()
            }
        }
    }

    private nonisolated func carryStream(
        _ guest: NIOAsyncChannel<ByteBuffer, ByteBuffer>, attached: inout Int?
    ) async throws {
        try await guest.executeThenClose { inbound, outbound in
            let mine = await self.attach(outbound)
            attached = mine
            var decoder = FrameDecoder(spawnLimit: Frame.maximumPayload)
            var broken: String?
            do {
                reading: for try await buffer in inbound {
                    decoder.append(buffer.readableBytesView)
                    // One hop onto the actor per read, not per frame: a read of output holds several.
                    // The frames before a malformed one are still delivered, as they would have been
                    // had it come in a later read.
                    var frames: [Frame] = []
                    var malformed: FrameDecoder.DecodeError?
                    do throws(FrameDecoder.DecodeError) {
                        while let frame = try decoder.next() { frames.append(frame) }
                    } catch {
                        malformed = error
                    }
                    if !frames.isEmpty, let why = await self.route(frames) {
                        broken = why
                        break reading
                    }
                    if let malformed { throw malformed }
                }
            } catch let error as FrameDecoder.DecodeError {
                broken = "it sent a malformed frame (\(error))"
            } catch {
                log.debug("guest channel: \(error)")
            }
            if let broken {
                log.error(
                    "the guest helper broke the protocol: \(broken); its port is closed, and commands in "
                        + "the testbed fail from now on")
            }
            await self.guestClosed(broken, generation: mine)
        }
    }

    /// Waits until a helper has said hello with a boot id other than `previous` and clients can
    /// connect (``serve()`` has bound its socket); returns the boot id. A
    /// helper of another version (a saved state's, left by another server) is an error.
    public func waitForHelper(notBootID previous: String?, timeout: Duration) async throws(VirtError) -> String {
        let started = try await Deadline(after: timeout).poll(every: .milliseconds(20)) {
            () throws(VirtError) -> String? in
            if let listenFailure { throw VirtError(.testbedFailure, listenFailure) }
            if let helperBootID, helperBootID != previous, listening { return helperBootID }
            if guestLost { throw VirtError(.testbedFailure, "the guest helper's port closed") }
            return nil
        }
        guard let started else {
            if Task.isCancelled { throw VirtError(.timeout, "waiting for the guest helper was cancelled") }
            throw VirtError(.timeout, "the guest helper did not start within \(timeout.formattedSeconds)")
        }
        guard helperVersion == expectedVersion else {
            throw VirtError(
                .testbedFailure,
                "the guest helper is version \(helperVersion ?? "(none)"), not this server's \(expectedVersion)")
        }
        return started
    }

    /// Waits until the relay holds its connection to the guest port's socket: a VM restored from
    /// a saved state must find the host side of the port connected, as it was when saved, or the
    /// guest sees the port close and the helper in it ends.
    public func waitUntilConnected(timeout: Duration) async throws(VirtError) {
        let connected = try await Deadline(after: timeout).poll(every: .milliseconds(10)) {
            () throws(VirtError) -> Bool in
            if guest != nil { return true }
            if guestLost { throw VirtError(.testbedFailure, "the guest helper's port closed") }
            return false
        }
        guard connected else {
            if Task.isCancelled { throw VirtError(.timeout, "waiting for the guest helper's port was cancelled") }
            throw VirtError(.timeout, "cannot connect to the guest helper's port within \(timeout.formattedSeconds)")
        }
    }

    /// Tells the running helper the VM was restored (see ``Frame/Kind/resumed``) and forgets it
    /// until it says hello again.
    public func announceResume(_ payload: [UInt8]) async throws(VirtError) {
        guard let guest else { throw VirtError(.testbedFailure, "the guest helper's port is not connected") }
        helperBootID = nil
        do {
            try await guest.write(Frame(channel: 0, .resumed, payload).buffer)
        } catch {
            throw VirtError(.testbedFailure, "cannot reach the guest helper: \(error)")
        }
    }

    /// A new guest stream is about to be carried: until it has been and its helper has said
    /// hello, ``waitForHelper(notBootID:timeout:)`` waits rather than failing on the last one's
    /// end.
    public func expectGuest() {
        guestLost = false
        helperBootID = nil
    }

    /// No guest stream is coming (its carrier was stopped before it attached one): a wait for
    /// the helper fails now instead of at its timeout.
    public func markLost() {
        if guest == nil { guestLost = true }
    }

    /// Forgets the helper (it is about to go away with a reboot): commands in flight end with an
    /// error and new ones fail until the next hello.
    public func helperGone(_ reason: String) {
        helperBootID = nil
        failAll(reason)
    }

    private func attach(_ writer: NIOAsyncChannelOutboundWriter<ByteBuffer>) -> Int {
        generation += 1
        guest = writer
        guestLost = false
        helperBootID = nil
        return generation
    }

    private func guestClosed(_ broken: String?, generation ended: Int) {
        guard ended == generation else { return }
        guest = nil
        guestLost = true
        helperBootID = nil
        failAll(broken.map { "the testbed's helper broke the protocol: \($0)" } ?? "the testbed is gone")
    }

    private func failAll(_ reason: String) {
        for continuation in clients.values {
            continuation.yield(.failure(reason))
            continuation.finish()
        }
        clients.removeAll()
        allowances.removeAll()
    }

    /// Hands frames from the guest to their commands' clients, in order. Returns why the guest
    /// channel must be dropped when one breaks the protocol's bounds (those after it are not
    /// handed on).
    private func route(_ frames: [Frame]) -> String? {
        for frame in frames {
            if let broken = route(frame) { return broken }
        }
        return nil
    }

    private func route(_ frame: Frame) -> String? {
        switch frame.kind {
        case .hello:
            if helperBootID != nil { failAll("the guest helper restarted") }
            let text = String(decoding: frame.payload, as: UTF8.self)
            let words = text.split(separator: " ")
            helperBootID = String(words.first ?? "")
            helperVersion = words.count > 1 ? String(words[1]) : nil
            helperStatus = words.dropFirst(2).joined(separator: " ")
            log.debug("guest helper up: \(text)")
        case .stdout, .stderr:
            guard let continuation = clients[frame.channel], var allowance = allowances[frame.channel] else { break }
            allowance.output -= frame.payload.count
            // One frame of slack: the helper's own "cannot run" message is sent without credit.
            guard allowance.output >= -Frame.maximumPayload else {
                return "it sent command output beyond the credit window (\(Frame.window) bytes plus what was read)"
            }
            allowances[frame.channel] = allowance
            continuation.yield(frame)
        case .stdinCredit:
            guard let continuation = clients[frame.channel], var allowance = allowances[frame.channel],
                frame.countValue > 0
            else { break }
            allowance.stdin -= frame.countValue
            guard allowance.stdin >= 0 else { return "it acknowledged more stdin than was sent" }
            allowances[frame.channel] = allowance
            continuation.yield(frame)
        case .exit:
            allowances[frame.channel] = nil
            if let continuation = clients.removeValue(forKey: frame.channel) {
                continuation.yield(frame)
                continuation.finish()
            }
        default:
            break
        }
        return nil
    }

    /// Counts a frame from a client before it goes to the guest: credits widen the window, stdin
    /// is owed an acknowledgement.
    private func account(_ frame: Frame, channel: UInt32) {
        guard var allowance = allowances[channel] else { return }
        switch frame.kind {
        case .credit: allowance.output += frame.countValue
        case .stdin: allowance.stdin += frame.payload.count
        default: return
        }
        allowances[channel] = allowance
    }

    /// Registers a new command; nil when there is no helper to run it.
    private func register(
        _ continuation: AsyncStream<Frame>.Continuation, spawn: Frame
    ) -> (UInt32, NIOAsyncChannelOutboundWriter<ByteBuffer>)? {
        guard let guest, helperBootID != nil else { return nil }
        let channel = nextChannel
        nextChannel &+= 1
        if nextChannel == 0 { nextChannel = 1 }
        clients[channel] = continuation
        allowances[channel] = (output: Self.window(of: spawn), stdin: 0)
        return (channel, guest)
    }

    /// The output window a spawn request grants: its first field's first word.
    static func window(of spawn: Frame) -> Int {
        let head = spawn.payload.prefix { $0 != 0 && $0 != UInt8(ascii: " ") }
        return Int(String(decoding: head, as: UTF8.self)).map { max(0, min($0, Int(UInt32.max))) } ?? 0
    }

    /// The client went away before its command ended: stop the command.
    private func abandon(_ channel: UInt32) -> NIOAsyncChannelOutboundWriter<ByteBuffer>? {
        allowances[channel] = nil
        guard clients.removeValue(forKey: channel) != nil else { return nil }
        return guest
    }

    private nonisolated func serve(_ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>) async {
        let (replies, continuation) = AsyncStream.makeStream(of: Frame.self)
        do {
            try await connection.executeThenClose { inbound, outbound in
                try await withThrowingDiscardingTaskGroup { tasks in
                    tasks.addTask {
                        for await var frame in replies {
                            frame.channel = 0
                            try await outbound.write(frame.buffer)
                        }
                    }
                    var decoder = FrameDecoder()
                    var assigned: (channel: UInt32, guest: NIOAsyncChannelOutboundWriter<ByteBuffer>)?
                    var guestGone = false
                    defer { continuation.finish() }
                    do {
                        for try await buffer in inbound {
                            decoder.append(buffer.readableBytesView)
                            while var frame = try decoder.next() {
                                if assigned == nil {
                                    guard frame.kind == .spawn,
                                        let registered = await self.register(continuation, spawn: frame)
                                    else {
                                        continuation.yield(Self.notReady)
                                        continuation.finish()
                                        return
                                    }
                                    assigned = registered
                                }
                                guard let (channel, guest) = assigned else { return }
                                if frame.kind == .credit || frame.kind == .stdin {
                                    await self.account(frame, channel: channel)
                                }
                                frame.channel = channel
                                guard !guestGone else { continue }
                                do {
                                    try await guest.write(frame.buffer)
                                } catch {
                                    // Read on until the client hangs up: leaving the inbound
                                    // stream closes the connection before the reply task has
                                    // delivered what the client is owed, its failure included.
                                    log.debug("auxverb client's frame to the guest: \(error)")
                                    guestGone = true
                                }
                            }
                        }
                    } catch {
                        log.debug("auxverb client: \(error)")
                    }
                    if let (channel, _) = assigned, let guest = await self.abandon(channel) {
                        try? await guest.write(
                            Frame(channel: channel, .kill, Array("\(SIGKILL)".utf8)).buffer)
                    }
                }
            }
        } catch {
            log.debug("auxverb connection ended: \(error)")
        }
    }

    static let notReady = Frame.failure("the testbed is not ready (rebooting, or gone)")
}

extension Frame {
    /// Header and payload in one buffer (``encoded``'s bytes), the payload copied once.
    public var buffer: ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: Frame.headerSize + payload.count)
        buffer.writeInteger(channel)
        buffer.writeInteger(kind.rawValue)
        buffer.writeInteger(UInt32(payload.count))
        buffer.writeBytes(payload)
        return buffer
    }
}

/// Connections the listening socket accepted that the serving loop has not taken yet. A loop
/// that ends (cancelled) leaves those in NIO's stream, which drops them, and NIO traps on a
/// connection dropped before it was closed (swift-nio#2637, #3481): they are held here, and
/// closed once the listening socket is.
final class UntakenConnections: Sendable {
    private let connections = Mutex<[ObjectIdentifier: NIOAsyncChannel<ByteBuffer, ByteBuffer>]>([:])

    func hold(_ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>) {
        connections.withLock { $0[ObjectIdentifier(connection.channel)] = connection }
    }

    func release(_ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>) {
        _ = connections.withLock { $0.removeValue(forKey: ObjectIdentifier(connection.channel)) }
    }

    /// Waits for `server` to close (no connection is accepted after that), then closes those
    /// never taken.
    func finish(after server: any Channel) async {
        server.close(promise: nil)
        try? await server.closeFuture.get()
        let left = connections.withLock { connections in
            defer { connections.removeAll() }
            return Array(connections.values)
        }
        for connection in left {
            try? await connection.executeThenClose { _, _ in }
        }
    }
}
