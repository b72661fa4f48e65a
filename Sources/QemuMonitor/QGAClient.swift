import VirtCore

/// How a process started with ``QGAClient/exec(path:arguments:environment:input:captureOutput:timeout:)`` ended.
public struct GuestExecResult: Sendable, Equatable {
    /// The exit status, when the process exited normally.
    public var exitCode: Int32?
    /// The signal that killed the process, when it was killed.
    public var signal: Int32?
    public var standardOutput: [UInt8]
    public var standardError: [UInt8]
    /// The agent keeps at most 16 MiB of each stream: true when it dropped some.
    public var outputTruncated: Bool

    public init(
        exitCode: Int32? = nil, signal: Int32? = nil, standardOutput: [UInt8] = [], standardError: [UInt8] = [],
        outputTruncated: Bool = false
    ) {
        self.exitCode = exitCode
        self.signal = signal
        self.standardOutput = standardOutput
        self.standardError = standardError
        self.outputTruncated = outputTruncated
    }
}

/// qemu-guest-agent client.
///
/// QGA has no greeting and its replies carry no id, so commands run one at a time and the stream
/// is resynchronised with `guest-sync-delimited` whenever it may hold stale data: before the first
/// command and after any call that did not see its reply (timeout, cancellation, ``send(_:arguments:timeout:)``).
/// The agent serves one client at a time: a second connection is accepted by the socket but not
/// answered until the first one closes.
public actor QGAClient {
    /// The most file data sent in one `guest-file-write` (before base64).
    public static let writeChunkSize = 1 << 20
    /// The most file data asked for in one `guest-file-read` (the agent allows up to 48 MiB).
    public static let readChunkSize = 4 << 20

    private let connection: LineConnection
    private let lock = AsyncLock()
    /// False whenever a reply we did not read may still arrive.
    private var inSync = false

    private init(connection: LineConnection) {
        self.connection = connection
    }

    /// Connects to the agent's socket, retrying until it exists and accepts, up to `timeout`.
    ///
    /// Nothing is exchanged yet: inside a VM the socket belongs to QEMU and accepts long before
    /// the agent runs. Use ``sync(timeout:)`` to wait for the agent.
    public static func connect(path: String, timeout: Duration) async throws(VirtError) -> QGAClient {
        QGAClient(connection: try await LineConnection.connect(path: path, name: "QGA \(path)", timeout: timeout))
    }

    /// Brings the stream into a known state with `guest-sync-delimited` and a random id,
    /// discarding every line up to the 0xFF-delimited reply that carries that id.
    ///
    /// Throws a ``VirtError/Code/timeout`` error if the agent does not answer within `timeout`:
    /// it may not be running yet, and callers retry.
    public func sync(timeout: Duration) async throws(VirtError) {
        try await withTimeout(timeout, "QGA guest-sync-delimited") {
            try await self.exclusively(.sync)
        }
    }

    /// Runs `command` and returns its "return" value; an "error" reply becomes a
    /// ``VirtError/Code/testbedFailure`` error "QGA <command>: <class>: <desc>".
    ///
    /// `timeout` covers waiting for earlier commands and the resynchronisation that follows a
    /// timed-out call.
    public func execute(
        _ command: String,
        arguments: [String: JSONValue]? = nil,
        timeout: Duration = .seconds(30)
    ) async throws(VirtError) -> JSONValue {
        let request = Self.request(command, arguments)
        let what = "QGA \(command)"
        return try await withTimeout(timeout, what) {
            try await self.exclusively(.execute(request, what: what))
        }
    }

    /// Sends a command that replies nothing on success (guest-shutdown, guest-suspend-*) without
    /// waiting; a failure reply, if any, is discarded by the next resynchronisation.
    public func send(
        _ command: String,
        arguments: [String: JSONValue]? = nil,
        timeout: Duration = .seconds(30)
    ) async throws(VirtError) {
        let request = Self.request(command, arguments)
        try await withTimeout(timeout, "QGA \(command)") {
            _ = try await self.exclusively(.send(request))
        }
    }

    /// `guest-ping`: succeeds when the agent answers.
    public func ping(timeout: Duration) async throws(VirtError) {
        _ = try await execute("guest-ping", timeout: timeout)
    }

    /// Creates or truncates `path` in the guest and writes `contents` to it, in chunks of at most
    /// ``writeChunkSize`` bytes; `timeout` applies to each request. The agent creates files with
    /// mode 0666 (minus the agent's umask).
    public func writeFile(path: String, contents: [UInt8], timeout: Duration = .seconds(30)) async throws(VirtError) {
        let handle = try await openFile(path, mode: "w", timeout: timeout)
        do throws(VirtError) {
            var offset = 0
            while offset < contents.count {
                let end = min(offset + Self.writeChunkSize, contents.count)
                let reply = try await execute(
                    "guest-file-write",
                    arguments: ["handle": handle, "buf-b64": .string(Base64.encode(contents[offset..<end]))],
                    timeout: timeout)
                // A short write is resumed where it stopped; no progress at all would loop forever.
                guard let count = reply["count"]?.intValue, count > 0, count <= end - offset else {
                    throw VirtError(.testbedFailure, "QGA guest-file-write to \(path): unexpected reply \(reply)")
                }
                offset += count
            }
        } catch {
            await closeFileQuietly(handle)
            throw error
        }
        // The agent writes through stdio: errors such as ENOSPC may only show up when closing.
        _ = try await execute("guest-file-close", arguments: ["handle": handle], timeout: timeout)
    }

    /// Reads all of `path` from the guest, ``readChunkSize`` bytes per request; `timeout` applies
    /// to each request.
    public func readFile(path: String, timeout: Duration = .seconds(30)) async throws(VirtError) -> [UInt8] {
        let handle = try await openFile(path, mode: "r", timeout: timeout)
        var contents: [UInt8] = []
        do throws(VirtError) {
            while true {
                let reply = try await execute(
                    "guest-file-read", arguments: ["handle": handle, "count": JSONValue(Self.readChunkSize)],
                    timeout: timeout)
                guard let encoded = reply["buf-b64"]?.stringValue, let bytes = Base64.decode(encoded) else {
                    throw VirtError(.testbedFailure, "QGA guest-file-read from \(path): unexpected reply")
                }
                contents.append(contentsOf: bytes)
                // "eof" may come with the last data or on an empty read after it.
                if reply["eof"]?.boolValue == true || bytes.isEmpty { break }
            }
        } catch {
            await closeFileQuietly(handle)
            throw error
        }
        _ = try await execute("guest-file-close", arguments: ["handle": handle], timeout: timeout)
        return contents
    }

    /// Starts `path` with `arguments` in the guest (`guest-exec`) and returns its pid.
    ///
    /// `environment` ("NAME=value" strings) replaces the agent's environment rather than adding
    /// to it; `input` is fed to stdin in one piece. Captured output is only available once the
    /// process has exited, through ``waitForExec(pid:timeout:)``.
    public func exec(
        path: String,
        arguments: [String] = [],
        environment: [String]? = nil,
        input: [UInt8]? = nil,
        captureOutput: Bool,
        timeout: Duration = .seconds(30)
    ) async throws(VirtError) -> Int {
        var request: [String: JSONValue] = [
            "path": .string(path), "arg": JSONValue(arguments), "capture-output": .bool(captureOutput),
        ]
        if let environment { request["env"] = JSONValue(environment) }
        if let input { request["input-data"] = .string(Base64.encode(input)) }
        let reply = try await execute("guest-exec", arguments: request, timeout: timeout)
        guard let pid = reply["pid"]?.intValue else {
            throw VirtError(.testbedFailure, "QGA guest-exec: unexpected reply \(reply)")
        }
        return pid
    }

    /// Polls `guest-exec-status` (every 20 ms at first, backing off to 200 ms) until the process
    /// has exited, within `timeout`.
    ///
    /// The agent forgets a process once it reported it exited: a second wait for the same pid fails.
    public func waitForExec(pid: Int, timeout: Duration) async throws(VirtError) -> GuestExecResult {
        try await withTimeout(timeout, "waiting for guest process \(pid)") {
            var interval = Duration.milliseconds(20)
            while true {
                let status = try await self.execute(
                    "guest-exec-status", arguments: ["pid": JSONValue(pid)], timeout: timeout)
                if status["exited"]?.boolValue == true {
                    return try Self.execResult(from: status)
                }
                try await Task.sleep(for: interval)
                interval = min(interval * 3 / 2, .milliseconds(200))
            }
        }
    }

    /// Closes the connection, which frees the agent for another client; later calls fail.
    public func close() async {
        await connection.close()
    }

    // MARK: - Internals

    static func request(_ command: String, _ arguments: [String: JSONValue]?) -> [UInt8] {
        var request: [String: JSONValue] = ["execute": .string(command)]
        if let arguments { request["arguments"] = .object(arguments) }
        return JSONValue.object(request).serializedBytes + [0x0A]
    }

    static func execResult(from status: JSONValue) throws(VirtError) -> GuestExecResult {
        func data(_ key: String) throws(VirtError) -> [UInt8] {
            guard let value = status[key] else { return [] }
            guard let text = value.stringValue, let bytes = Base64.decode(text) else {
                throw VirtError(.testbedFailure, "QGA guest-exec-status: \(key) is not base64")
            }
            return bytes
        }
        return GuestExecResult(
            exitCode: status["exitcode"]?.intValue.flatMap { Int32(exactly: $0) },
            signal: status["signal"]?.intValue.flatMap { Int32(exactly: $0) },
            standardOutput: try data("out-data"),
            standardError: try data("err-data"),
            outputTruncated: status["out-truncated"]?.boolValue == true || status["err-truncated"]?.boolValue == true)
    }

    /// The JSON of a reply line: what follows the last 0xFF delimiter, if any. A delimiter is
    /// never part of valid UTF-8, so it can only be the agent's sentinel.
    static func payload(of line: [UInt8]) -> ArraySlice<UInt8> {
        guard let marker = line.lastIndex(of: 0xFF) else { return line[...] }
        return line[(marker + 1)...]
    }

    private func openFile(_ path: String, mode: String, timeout: Duration) async throws(VirtError) -> JSONValue {
        let reply = try await execute(
            "guest-file-open", arguments: ["path": .string(path), "mode": .string(mode)], timeout: timeout)
        guard reply.intValue != nil else {
            throw VirtError(.testbedFailure, "QGA guest-file-open \(path): unexpected reply \(reply)")
        }
        return reply
    }

    private func closeFileQuietly(_ handle: JSONValue) async {
        do {
            _ = try await execute("guest-file-close", arguments: ["handle": handle], timeout: .seconds(5))
        } catch {
            log.debug("QGA: could not close file handle \(handle) after an error: \(error)")
        }
    }

    /// One use of the stream.
    private enum Exchange: Sendable {
        case sync
        case execute([UInt8], what: String)
        case send([UInt8])
    }

    /// Performs `exchange` holding the lock, so one exchange at a time uses the stream.
    @discardableResult
    private func exclusively(_ exchange: Exchange) async throws -> JSONValue {
        try await lock.withLock {
            switch exchange {
            case .sync:
                try await performSync()
                return .null
            case .execute(let request, let what):
                return try await performExecute(request, what: what)
            case .send(let request):
                try await performSend(request)
                return .null
            }
        }
    }

    private func performSync() async throws {
        inSync = false
        let id = Int.random(in: 1...(1 << 52))
        // The leading 0xFF makes the agent drop any partial request an earlier client left behind.
        let request =
            [0xFF] + Self.request("guest-sync-delimited", ["id": JSONValue(id)])
        try await connection.send(request)
        while true {
            let line = try await connection.lines.next()
            if let reply = try? JSONValue(parsing: Self.payload(of: line)), reply["return"]?.intValue == id {
                inSync = true
                return
            }
            log.debug("QGA: discarding \(String(decoding: line.prefix(200), as: UTF8.self))")
        }
    }

    private func performExecute(_ request: [UInt8], what: String) async throws -> JSONValue {
        if !inSync { try await performSync() }
        inSync = false
        try await connection.send(request)
        while true {
            let payload = Self.payload(of: try await connection.lines.next())
            if payload.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
            let reply: JSONValue
            do {
                reply = try JSONValue(parsing: payload)
            } catch {
                throw VirtError(.testbedFailure, "\(what): \(error.message)")
            }
            inSync = true
            return try unwrapReply(reply, command: what)
        }
    }

    private func performSend(_ request: [UInt8]) async throws {
        if !inSync { try await performSync() }
        inSync = false
        try await connection.send(request)
    }
}
