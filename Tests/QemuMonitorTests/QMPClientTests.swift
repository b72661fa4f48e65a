import Testing
import VirtCore

@testable import QemuMonitor

/// Plays QEMU's side of the greeting and capabilities handshake.
private func connectedClient(_ peer: FakePeer) async throws -> QMPClient {
    async let connecting = QMPClient.connect(path: peer.path, timeout: .seconds(60))
    try await peer.waitForClient()
    peer.send(
        #"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#
            + "\r")
    let negotiation = try await peer.nextMessage()
    #expect(negotiation["execute"] == "qmp_capabilities")
    #expect(negotiation["arguments"] == nil)
    peer.send(["return": [:], "id": negotiation["id"] ?? nil])
    return try await connecting
}

@Suite("QMP client against a fake QEMU")
struct QMPClientTests {
    @Test("connecting waits for the socket, reads the greeting and negotiates capabilities")
    func handshake() async throws {
        try await withFakePeer { peer in
            let client = try await connectedClient(peer)
            #expect(client.greeting.capabilities == ["oob"])
            #expect(
                [client.greeting.version.major, client.greeting.version.minor, client.greeting.version.micro] == [
                    10, 0, 2,
                ])
            await client.close()
        }
    }

    @Test("connecting to a socket that never appears times out with a clear error")
    func connectTimeout() async throws {
        let clock = ContinuousClock()
        let start = clock.now
        do {
            _ = try await QMPClient.connect(path: "/nonexistent/qmp.sock", timeout: .milliseconds(300))
            Issue.record("expected a timeout")
        } catch {
            #expect(error.code == .timeout)
            #expect(error.message.contains("/nonexistent/qmp.sock"))
        }
        // Far from the 300 ms asked for, because a loaded CI machine is slow; the point is that
        // it gives up instead of waiting for ever.
        #expect(clock.now - start < .seconds(60))
    }

    @Test("an event QEMU queued ahead of the greeting (RESUME, for a client that connected late) is kept, in order")
    func eventBeforeGreeting() async throws {
        try await withFakePeer { peer in
            async let connecting = QMPClient.connect(path: peer.path, timeout: .seconds(60))
            try await peer.waitForClient()
            peer.send(#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"# + "\r")
            peer.send(
                #"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#
                    + "\r")
            let negotiation = try await peer.nextMessage()
            #expect(negotiation["execute"] == "qmp_capabilities")
            peer.send(["return": [:], "id": negotiation["id"] ?? nil])
            let client = try await connecting
            #expect(client.greeting.version.major == 10)
            peer.send(#"{"timestamp": {"seconds": 3, "microseconds": 4}, "event": "STOP"}"#)
            var names: [String] = []
            for await event in client.events {
                names.append(event.name)
                if names.count == 2 { break }
            }
            #expect(names == ["RESUME", "STOP"])
            await client.close()
        }
    }

    @Test("a peer that is not QMP fails the handshake instead of being trusted")
    func notAGreeting() async throws {
        try await withFakePeer { peer in
            let connecting = Task { try await QMPClient.connect(path: peer.path, timeout: .seconds(60)) }
            try await peer.waitForClient()
            peer.send(#"{"return": {}}"#)
            let error = await caughtError { _ = try await connecting.value }
            #expect(error?.code == .testbedFailure)
            #expect(error?.message.contains("expected a greeting") == true)
        }
    }

    @Test("replies are matched by id even when an event and another command's reply come first")
    func matchesIDs() async throws {
        try await withFakePeer { peer in
            let client = try await connectedClient(peer)
            async let status = client.execute("query-status", returning: AnyJSON.self)
            async let name = client.execute(
                "query-name", arguments: ["verbose": true] as AnyJSON, returning: AnyJSON.self)
            var ids: [String: AnyJSON] = [:]
            for _ in 0..<2 {
                let request = try await peer.nextMessage()
                let id = try #require(request["id"])
                ids[try #require(request["execute"]?.stringValue)] = id
                if request["execute"] == "query-name" { #expect(request["arguments"] == ["verbose": true]) }
            }
            #expect(ids["query-status"] != ids["query-name"])
            peer.send(#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#)
            peer.send(["return": ["name": "vm"], "id": try #require(ids["query-name"])])
            peer.send(["return": ["status": "running", "running": true], "id": try #require(ids["query-status"])])
            #expect(try await status == ["status": "running", "running": true])
            #expect(try await name == ["name": "vm"])
            var events = client.events.makeAsyncIterator()
            #expect(await events.next()?.name == "STOP")
            await client.close()
        }
    }

    @Test("an error reply becomes a testbed failure naming the command, class and description")
    func errorReply() async throws {
        try await withFakePeer { peer in
            let client = try await connectedClient(peer)
            let result = Task { try await client.execute("nope") }
            let request = try await peer.nextMessage()
            peer.send([
                "id": try #require(request["id"]),
                "error": ["class": "CommandNotFound", "desc": "The command nope has not been found"],
            ])
            let error = await caughtError { _ = try await result.value }
            #expect(
                error == VirtError(.testbedFailure, "QMP nope: CommandNotFound: The command nope has not been found"))
            await client.close()
        }
    }

    @Test("events are delivered in order with their data, and the stream ends when the connection does")
    func eventsInOrder() async throws {
        try await withFakePeer { peer in
            let client = try await connectedClient(peer)
            let names = ["STOP", "RESUME", "POWERDOWN", "RESET", "SHUTDOWN"]
            for (index, name) in names.enumerated() {
                peer.send(["event": .string(name), "data": ["n": AnyJSON(index)], "timestamp": [:]])
            }
            peer.disconnect()
            var received: [String] = []
            var data: [AnyJSON?] = []
            for await event in client.events {
                received.append(event.name)
                data.append(event.data(as: AnyJSON.self))
            }
            #expect(received == names)
            #expect(data == names.indices.map { ["n": AnyJSON($0)] })
        }
    }

    @Test("QEMU closing the socket mid-call fails that call and later ones promptly")
    func peerClosesMidCall() async throws {
        try await withFakePeer { peer in
            let client = try await connectedClient(peer)
            let result = Task { try await client.execute("query-status", timeout: .seconds(60)) }
            _ = try await peer.nextMessage()
            let clock = ContinuousClock()
            let start = clock.now
            peer.disconnect()
            let error = await caughtError { _ = try await result.value }
            #expect(error?.code == .testbedFailure)
            #expect(error?.message.hasSuffix("connection closed") == true)
            #expect(clock.now - start < .seconds(40), "failed by the closed socket, not by the 60 s timeout")
            await #expect(throws: VirtError(.testbedFailure, "QMP \(peer.path): connection closed")) {
                try await client.execute("query-status")
            }
        }
    }

    @Test("a call that times out or is cancelled leaves the client usable; its late reply is dropped")
    func timeoutAndCancellation() async throws {
        try await withFakePeer { peer in
            let client = try await connectedClient(peer)
            await #expect(throws: VirtError.self) {
                try await client.execute("slow", timeout: .milliseconds(500))
            }
            let slow = try await peer.nextMessage()

            let cancelled = Task { try await client.execute("also-slow") }
            let alsoSlow = try await peer.nextMessage()
            cancelled.cancel()
            await #expect(throws: VirtError.self) { try await cancelled.value }

            async let next = client.execute("query-status", returning: String.self)
            let request = try await peer.nextMessage()
            peer.send(["return": "late", "id": try #require(slow["id"])])
            peer.send(["return": "later", "id": try #require(alsoSlow["id"])])
            peer.send(["return": "fresh", "id": try #require(request["id"])])
            #expect(try await next == "fresh")
            await client.close()
        }
    }
}
