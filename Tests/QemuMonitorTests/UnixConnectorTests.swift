import Foundation
import NIOCore
import NIOEmbedded
import Testing
import VirtCore
import VirtTestSupport

@testable import QemuMonitor

/// The one connect-with-retry of QMP, the guest agent, the serial console and the helper's port.
@Suite("Connecting to QEMU's unix sockets")
struct UnixConnectorTests {
    @Test("a socket that starts listening late is connected to, and its lines arrive")
    func connectsLate() async throws {
        try await withPrivateDirectory("connector-") { directory in
            let path = "\(directory)/qmp.sock"
            async let connection = LineConnection.connect(path: path, name: "QMP \(path)", timeout: .seconds(30))
            try await Task.sleep(for: .milliseconds(300))
            let listener = try TestSockets.listen(at: path)
            defer { close(listener) }
            // Never a blocking accept here: it would hold one of the cooperative pool's two
            // threads, which the connecting task needs.
            #expect(fcntl(listener, F_SETFL, O_NONBLOCK) == 0)
            let accepted = await Deadline(after: .seconds(60)).poll(every: .milliseconds(10)) { () -> Int32? in
                let fd = accept(listener, nil, nil)
                return fd >= 0 ? fd : nil
            }
            let client = try #require(accepted)
            defer { close(client) }
            let greeting = Array("hello\r\n".utf8)
            #expect(greeting.withUnsafeBytes { write(client, $0.baseAddress, $0.count) } == greeting.count)
            let lines = try await connection.lines
            #expect(try await lines.next() == Array("hello".utf8))
            // The peer goes away (a shutdown, not a close: the deferred close owns the descriptor).
            shutdown(client, Int32(SHUT_RDWR))
            await #expect(throws: VirtError.self) { _ = try await lines.next() }
        }
    }

    @Test("nothing listening: a timeout naming the socket and the last error")
    func timesOut() async throws {
        try await withPrivateDirectory("connector-") { directory in
            let path = "\(directory)/missing.sock"
            let clock = ContinuousClock()
            let started = clock.now
            let error = await caughtError {
                _ = try await SerialConsole.connect(path: path, timeout: .milliseconds(400))
            }
            #expect(error?.code == .timeout)
            #expect(error?.message.contains("cannot connect to serial console \(path) within 0.4 s") == true)
            #expect(clock.now - started >= .milliseconds(400))
            #expect(clock.now - started < .seconds(60), "it stops once the timeout has passed")
        }
    }

    @Test("a path too long for a socket address fails at once, not after the timeout")
    func pathTooLong() async throws {
        let path = "/tmp/" + String(repeating: "x", count: 200)
        let clock = ContinuousClock()
        let started = clock.now
        let error = await caughtError {
            _ = try await LineConnection.connect(path: path, name: "QMP", timeout: .seconds(60))
        }
        #expect(error?.code == .io)
        #expect(error?.message.hasPrefix("QMP: cannot connect:") == true)
        #expect(clock.now - started < .seconds(30), "at once, not after the 60 s timeout")
    }

    @Test("the forwarder queues what the channel reads, in order, and ends the queue with its error when the peer goes")
    func forwarderOnEmbeddedChannel() async throws {
        let bytes = Mailbox<[UInt8]>()
        let closed = VirtError(.testbedFailure, "QMP x: connection closed")
        let channel = EmbeddedChannel(handler: ByteForwarder(into: bytes, closedError: closed, name: "QMP x"))
        try await channel.connect(to: SocketAddress(unixDomainSocketPath: "/x")).get()
        try channel.writeInbound(ByteBuffer(bytes: [1, 2, 3]))
        try channel.writeInbound(ByteBuffer(bytes: [4]))
        #expect(try await bytes.next() == [1, 2, 3])
        #expect(try await bytes.next() == [4])
        _ = try await channel.close().get()
        let error = await #expect(throws: VirtError.self) { _ = try await bytes.next() }
        #expect(error?.message == "QMP x: connection closed")
        #expect(bytes.isFinished)
    }

    @Test(
        "lines are split at LF without their terminator (CRLF too), across reads, empty ones kept, a partial last one dropped"
    )
    func lineDecoder() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(LineDecoder(), maximumBufferSize: 1 << 10))
        for chunk in ["{\"a\"", ": 1}\r\n", "\n", "x\ry\n{\"b\"", "", ": 2}\r", "\n", "cut"] {
            try channel.writeInbound(ByteBuffer(string: chunk))
        }
        var lines: [String] = []
        while let line = try channel.readInbound(as: ByteBuffer.self) { lines.append(String(buffer: line)) }
        #expect(lines == [#"{"a": 1}"#, "", "x\ry", #"{"b": 2}"#])
        // The end of the stream: a last line without its LF is not one.
        _ = try channel.finish()
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)
    }

    @Test("a line longer than the limit is an error, not a buffer that grows without end")
    func lineTooLong() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(LineDecoder(), maximumBufferSize: 1 << 10))
        #expect(throws: (any Error).self) {
            for _ in 0..<4 { try channel.writeInbound(ByteBuffer(repeating: UInt8(ascii: "x"), count: 512)) }
        }
    }
}
