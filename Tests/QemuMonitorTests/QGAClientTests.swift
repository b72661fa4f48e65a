import Testing
import VirtCore

@testable import QemuMonitor

/// What the fake agent saw and kept, returned when the client disconnects.
private struct AgentRecord: Sendable {
    var files: [String: [UInt8]]
    var writeSizes: [Int] = []
    var readCounts: [Int] = []
    var execRequests: [AnyJSON] = []
    var statusPolls = 0
    var syncs = 0
}

/// A scripted guest agent: files in memory and one process that exits after a few polls.
private func serveAgent(
    _ peer: FakePeer, files: [String: [UInt8]] = [:], exitAfterPolls: Int = 3
) async throws -> AgentRecord {
    var record = AgentRecord(files: files)
    var handles: [Int: (path: String, offset: Int)] = [:]
    var nextHandle = 1000
    try await peer.waitForClient()
    while true {
        let line: [UInt8]
        do {
            line = try await peer.received.next()
        } catch {
            return record
        }
        let request = try AnyJSON(parsing: QGAClient.payload(of: line))
        let arguments = request["arguments"] ?? [:]
        func reply(_ value: AnyJSON) { peer.send(["return": value]) }
        func fail(_ text: String) { peer.send(["error": ["class": "GenericError", "desc": .string(text)]]) }
        switch request["execute"]?.stringValue {
        case "guest-sync-delimited":
            record.syncs += 1
            peer.send(bytes: [0xFF] + AnyJSON.object(["return": arguments["id"] ?? nil]).serializedBytes + [0x0A])
        case "guest-file-open":
            let path = arguments["path"]?.stringValue ?? ""
            if arguments["mode"] == "w" {
                record.files[path] = []
            } else if record.files[path] == nil {
                fail("failed to open file '\(path)' (mode: 'r'): No such file or directory")
                continue
            }
            nextHandle += 1
            handles[nextHandle] = (path, 0)
            reply(AnyJSON(nextHandle))
        case "guest-file-write":
            guard let handle = arguments["handle"]?.intValue, let file = handles[handle],
                let data = arguments["buf-b64"]?.stringValue.flatMap(TestBase64.decode)
            else {
                fail("bad write")
                continue
            }
            record.writeSizes.append(data.count)
            record.files[file.path, default: []].append(contentsOf: data)
            reply(["count": AnyJSON(data.count), "eof": false])
        case "guest-file-read":
            guard let handle = arguments["handle"]?.intValue, let file = handles[handle],
                let count = arguments["count"]?.intValue, let contents = record.files[file.path]
            else {
                fail("bad read")
                continue
            }
            record.readCounts.append(count)
            let end = min(file.offset + count, contents.count)
            handles[handle]?.offset = end
            reply([
                "count": AnyJSON(end - file.offset), "buf-b64": .string(TestBase64.encode(contents[file.offset..<end])),
                "eof": .bool(end == contents.count),
            ])
        case "guest-file-close":
            handles[arguments["handle"]?.intValue ?? -1] = nil
            reply([:])
        case "guest-ping":
            reply([:])
        case "guest-get-time":
            continue  // never answered: a command stuck in the guest
        case "guest-exec":
            record.execRequests.append(arguments)
            reply(["pid": 4242])
        case "guest-exec-status":
            record.statusPolls += 1
            if record.statusPolls < exitAfterPolls {
                reply(["exited": false])
            } else {
                reply([
                    "exited": true, "exitcode": 0, "out-data": .string(TestBase64.encode(Array("hello\n".utf8))),
                    "err-data": .string(TestBase64.encode([0, 0xFF, 0x0A])),
                ])
            }
        default:
            peer.send(["error": ["class": "CommandNotFound", "desc": "The command has not been found"]])
        }
    }
}

/// Reads the client's guest-sync-delimited request (checking the leading 0xFF) and returns its id.
private func expectSync(_ peer: FakePeer) async throws -> AnyJSON {
    let line = try await peer.nextLine()
    #expect(line.first == 0xFF, "the client flushes the agent's parser before syncing")
    let request = try AnyJSON(parsing: line.dropFirst())
    #expect(request["execute"] == "guest-sync-delimited")
    return try #require(request["arguments"]?["id"])
}

@Suite("QGA client against a fake agent")
struct QGAClientTests {
    @Test("sync discards stale replies and garbage until the 0xFF-delimited reply with its own id")
    func syncDiscardsStaleLines() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            async let syncing: Void = client.sync(timeout: .seconds(60))
            let id = try await expectSync(peer)
            peer.send(#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#)
            peer.send(#"{"return": {"pid": 42}}"#)
            peer.send("garbage that is not JSON")
            peer.send(bytes: Array("half a line".utf8) + [0xFF] + Array(#"{"return": 1}"#.utf8) + [0x0A])
            peer.send(bytes: [0xFF] + Array(#"{"return": "#.utf8))
            peer.send(bytes: Array("\(id)}\n".utf8))
            try await syncing

            async let ping: Void = client.ping(timeout: .seconds(60))
            #expect(try await peer.nextMessage() == ["execute": "guest-ping"], "no second sync once in step")
            peer.send(#"{"return": {}}"#)
            try await ping
            await client.close()
        }
    }

    @Test("sync times out when the agent is silent, as it is before the guest has booted")
    func syncTimesOut() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            await #expect(throws: VirtError.self) { try await client.sync(timeout: .milliseconds(150)) }
            let error = await caughtError { try await client.sync(timeout: .milliseconds(150)) }
            #expect(error?.code == .timeout)
            await client.close()
        }
    }

    @Test("the first command syncs first; after a timed-out command the next one resyncs and skips the late reply")
    func resyncAfterTimeout() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            // The first command, answered: no time limit that a loaded machine could miss (a
            // test process's tasks can wait seconds for a thread).
            async let first = client.execute("guest-ping", timeout: .seconds(60))
            let firstID = try await expectSync(peer)
            peer.send(bytes: [0xFF] + AnyJSON.object(["return": firstID]).serializedBytes + [0x0A])
            #expect(try await peer.nextMessage() == ["execute": "guest-ping"])
            peer.send(#"{"return": {}}"#)
            _ = try await first
            // In step now: the next command goes out without a sync, and its reply never comes.
            let slow = Task { try await client.execute("guest-info", timeout: .seconds(1)) }
            #expect(try await peer.nextMessage() == ["execute": "guest-info"])
            #expect(await caughtError { _ = try await slow.value }?.code == .timeout)

            async let next = client.execute("guest-get-host-name", returning: AnyJSON.self, timeout: .seconds(60))
            let secondID = try await expectSync(peer)
            #expect(secondID != firstID)
            peer.send(#"{"return": {"version": "late guest-info reply"}}"#)
            peer.send(bytes: [0xFF] + AnyJSON.object(["return": secondID]).serializedBytes + [0x0A])
            #expect(try await peer.nextMessage() == ["execute": "guest-get-host-name"])
            peer.send(#"{"return": {"host-name": "guest"}}"#)
            #expect(try await next == ["host-name": "guest"])
            await client.close()
        }
    }

    @Test("cancelling a waiting command does not wedge the client: the next command resyncs")
    func cancellation() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let agent = Task { try await serveAgent(peer) }
            try await client.sync(timeout: .seconds(60))
            let waiting = Task { try await client.execute("guest-get-time", timeout: .seconds(30)) }
            try await Task.sleep(for: .milliseconds(200))
            waiting.cancel()
            await #expect(throws: VirtError.self) { try await waiting.value }
            try await client.ping(timeout: .seconds(60))
            try await client.ping(timeout: .seconds(60))
            await client.close()
            let record = try await agent.value
            #expect(record.syncs == 2, "the command after the cancelled one resynced")
        }
    }

    @Test("commands run one at a time even when callers overlap")
    func serialisesCommands() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let agent = Task { try await serveAgent(peer, files: ["/a": [1], "/b": [2, 2]]) }
            async let first = client.readFile(path: "/a")
            async let second = client.readFile(path: "/b")
            async let third = client.execute("guest-ping", returning: AnyJSON.self)
            #expect(try await first == [1])
            #expect(try await second == [2, 2])
            #expect(try await third == [:])
            await client.close()
            #expect(try await agent.value.syncs == 1)
        }
    }

    @Test("an error reply becomes a testbed failure with the agent's class and description")
    func errorReply() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let agent = Task { try await serveAgent(peer) }
            await #expect(
                throws: VirtError(
                    .testbedFailure,
                    "QGA guest-file-open: GenericError: failed to open file '/missing' (mode: 'r'): No such file or directory"
                )
            ) {
                try await client.readFile(path: "/missing")
            }
            try await client.ping(timeout: .seconds(60))
            await client.close()
            _ = try await agent.value
        }
    }

    @Test("writeFile sends 1 MiB chunks that arrive intact")
    func writeFileChunks() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let agent = Task { try await serveAgent(peer) }
            let contents = randomBytes(3 << 20 + 17)
            try await client.writeFile(path: "/tmp/file", contents: contents)
            try await client.writeFile(path: "/tmp/empty", contents: [])
            await client.close()
            let record = try await agent.value
            #expect(record.files["/tmp/file"] == contents)
            #expect(record.files["/tmp/empty"] == [])
            #expect(record.writeSizes == [1 << 20, 1 << 20, 1 << 20, 17])
        }
    }

    @Test("readFile reads until eof across several requests")
    func readFile() async throws {
        try await withFakePeer { peer in
            let contents = randomBytes(QGAClient.readChunkSize + 5)
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let agent = Task { try await serveAgent(peer, files: ["/data": contents, "/empty": []]) }
            #expect(try await client.readFile(path: "/data") == contents)
            #expect(try await client.readFile(path: "/empty") == [])
            await client.close()
            #expect(
                try await agent.value.readCounts == [
                    QGAClient.readChunkSize, QGAClient.readChunkSize, QGAClient.readChunkSize,
                ])
        }
    }

    @Test("exec sends argv, environment and input; waitForExec polls until exit and decodes the output")
    func execAndWait() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let agent = Task { try await serveAgent(peer, exitAfterPolls: 4) }
            let pid = try await client.exec(
                path: "/bin/echo", arguments: ["hello"], environment: ["LANG=C"], input: [1, 2, 3],
                captureOutput: true)
            #expect(pid == 4242)
            let result = try await client.waitForExec(pid: pid, timeout: .seconds(60))
            #expect(
                result
                    == GuestExecResult(
                        exitCode: 0, signal: nil, standardOutput: Array("hello\n".utf8), standardError: [0, 0xFF, 0x0A])
            )
            await client.close()
            let record = try await agent.value
            #expect(record.statusPolls == 4)
            #expect(
                record.execRequests == [
                    [
                        "path": "/bin/echo", "arg": ["hello"], "env": ["LANG=C"], "input-data": "AQID",
                        "capture-output": true,
                    ]
                ])
        }
    }

    @Test("waitForExec gives up after its timeout while the process keeps running")
    func waitTimesOut() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let agent = Task { try await serveAgent(peer, exitAfterPolls: .max) }
            try await client.sync(timeout: .seconds(60))
            let error = await caughtError { _ = try await client.waitForExec(pid: 4242, timeout: .milliseconds(500)) }
            #expect(error?.code == .timeout)
            try await client.ping(timeout: .seconds(60))
            await client.close()
            #expect(try await agent.value.statusPolls >= 1)
        }
    }

    @Test("the agent going away fails the waiting call promptly and every later one")
    func peerCloses() async throws {
        try await withFakePeer { peer in
            let client = try await QGAClient.connect(path: peer.path, timeout: .seconds(60))
            let result = Task { try await client.execute("guest-info", timeout: .seconds(30)) }
            _ = try await expectSync(peer)
            peer.disconnect()
            let error = await caughtError { _ = try await result.value }
            #expect(error == VirtError(.testbedFailure, "QGA \(peer.path): connection closed"))
            await #expect(throws: VirtError(.testbedFailure, "QGA \(peer.path): connection closed")) {
                try await client.ping(timeout: .seconds(60))
            }
        }
    }
}
