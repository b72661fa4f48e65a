import FoundationEssentials
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
            try await self.lock.withLock { try await self.performSync() }
        }
    }

    /// Runs `command` with `arguments` and returns its "return" value as `Value` (``Nothing``
    /// when the caller needs none of it); an "error" reply becomes a
    /// ``VirtError/Code/testbedFailure`` error "QGA <command>: <class>: <desc>", and so does a
    /// reply of another shape.
    ///
    /// `timeout` covers waiting for earlier commands and the resynchronisation that follows a
    /// timed-out call.
    @discardableResult
    public func execute<Arguments: Encodable & Sendable, Value: Decodable & Sendable>(
        _ command: String,
        arguments: Arguments? = Nothing?.none,
        returning: Value.Type = Nothing.self,
        timeout: Duration = .seconds(30)
    ) async throws(VirtError) -> Value {
        let request = try Request(execute: command, arguments: arguments, id: nil).line()
        let what = "QGA \(command)"
        return try await withTimeout(timeout, what) {
            try await self.lock.withLock { try await self.performExecute(request, what: what, returning: Value.self) }
        }
    }

    /// Sends a command that replies nothing on success (guest-shutdown, guest-suspend-*) without
    /// waiting; a failure reply, if any, is discarded by the next resynchronisation.
    public func send<Arguments: Encodable & Sendable>(
        _ command: String,
        arguments: Arguments? = Nothing?.none,
        timeout: Duration = .seconds(30)
    ) async throws(VirtError) {
        let request = try Request(execute: command, arguments: arguments, id: nil).line()
        try await withTimeout(timeout, "QGA \(command)") {
            try await self.lock.withLock { try await self.performSend(request) }
        }
    }

    /// `guest-ping`: succeeds when the agent answers.
    public func ping(timeout: Duration) async throws(VirtError) {
        try await execute("guest-ping", timeout: timeout)
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
                let written = try await execute(
                    "guest-file-write", arguments: FileWrite(handle: handle, data: Data(contents[offset..<end])),
                    returning: FileWritten.self, timeout: timeout)
                // A short write is resumed where it stopped; no progress at all would loop forever.
                guard written.count > 0, written.count <= end - offset else {
                    throw VirtError(
                        .testbedFailure,
                        "QGA guest-file-write to \(path): \(written.count) of \(end - offset) bytes written")
                }
                offset += written.count
            }
        } catch {
            await closeFileQuietly(handle)
            throw error
        }
        // The agent writes through stdio: errors such as ENOSPC may only show up when closing.
        try await execute("guest-file-close", arguments: GuestFile(handle: handle), timeout: timeout)
    }

    /// Reads all of `path` from the guest, ``readChunkSize`` bytes per request; `timeout` applies
    /// to each request.
    public func readFile(path: String, timeout: Duration = .seconds(30)) async throws(VirtError) -> [UInt8] {
        let handle = try await openFile(path, mode: "r", timeout: timeout)
        var contents: [UInt8] = []
        do throws(VirtError) {
            while true {
                let read = try await execute(
                    "guest-file-read", arguments: FileRead(handle: handle, count: Self.readChunkSize),
                    returning: FileData.self, timeout: timeout)
                contents.append(contentsOf: read.data)
                // "eof" may come with the last data or on an empty read after it.
                if read.eof || read.data.isEmpty { break }
            }
        } catch {
            await closeFileQuietly(handle)
            throw error
        }
        try await execute("guest-file-close", arguments: GuestFile(handle: handle), timeout: timeout)
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
        let request = Exec(
            path: path, arguments: arguments, environment: environment, input: input.map { Data($0) },
            captureOutput: captureOutput)
        return try await execute("guest-exec", arguments: request, returning: ExecStarted.self, timeout: timeout).pid
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
                    "guest-exec-status", arguments: ExecPID(pid: pid), returning: ExecStatus.self, timeout: timeout)
                if status.exited { return status.result }
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

    /// The JSON of a reply line: what follows the last 0xFF delimiter, if any. A delimiter is
    /// never part of valid UTF-8, so it can only be the agent's sentinel.
    static func payload(of line: [UInt8]) -> ArraySlice<UInt8> {
        guard let marker = line.lastIndex(of: 0xFF) else { return line[...] }
        return line[(marker + 1)...]
    }

    private func openFile(_ path: String, mode: String, timeout: Duration) async throws(VirtError) -> Int {
        try await execute(
            "guest-file-open", arguments: FileOpen(path: path, mode: mode), returning: Int.self, timeout: timeout)
    }

    private func closeFileQuietly(_ handle: Int) async {
        do {
            try await execute("guest-file-close", arguments: GuestFile(handle: handle), timeout: .seconds(5))
        } catch {
            log.debug("QGA: could not close file handle \(handle) after an error: \(error)")
        }
    }

    private func performSync() async throws {
        inSync = false
        let id = Int.random(in: 1...(1 << 52))
        // The leading 0xFF makes the agent drop any partial request an earlier client left behind.
        let request = try [0xFF] + Request(execute: "guest-sync-delimited", arguments: SyncID(id: id), id: nil).line()
        try await connection.send(request)
        while true {
            let line = try await connection.lines.next()
            if case .success(id) = MessageCoding.decoded(Reply<Int>.self, from: Self.payload(of: line)) {
                inSync = true
                return
            }
            log.debug("QGA: discarding \(String(decoding: line.prefix(200), as: UTF8.self))")
        }
    }

    private func performExecute<Value: Decodable>(
        _ request: [UInt8], what: String, returning: Value.Type
    ) async throws -> Value {
        if !inSync { try await performSync() }
        inSync = false
        try await connection.send(request)
        while true {
            let payload = Self.payload(of: try await connection.lines.next())
            if payload.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
            if let reply = MessageCoding.decoded(Reply<Value>.self, from: payload) {
                inSync = true
                return try reply.value(what)
            }
            // JSON of another shape is this command's reply all the same; a line that is not JSON
            // at all may be a fragment of anything, and the next command resynchronises.
            if MessageCoding.decoded(Nothing.self, from: payload) != nil { inSync = true }
            throw VirtError(.testbedFailure, "\(what): unexpected reply \(MessageCoding.excerpt(payload))")
        }
    }

    private func performSend(_ request: [UInt8]) async throws {
        if !inSync { try await performSync() }
        inSync = false
        try await connection.send(request)
    }
}

// MARK: - The agent's messages

extension QGAClient {
    struct SyncID: Encodable, Sendable {
        let id: Int
    }

    struct FileOpen: Encodable, Sendable {
        let path: String
        let mode: String
    }

    struct GuestFile: Encodable, Sendable {
        let handle: Int
    }

    struct FileWrite: Encodable, Sendable {
        let handle: Int
        let data: Data

        enum CodingKeys: String, CodingKey {
            case handle
            case data = "buf-b64"
        }
    }

    struct FileWritten: Decodable, Sendable {
        let count: Int
    }

    struct FileRead: Encodable, Sendable {
        let handle: Int
        let count: Int
    }

    struct FileData: Decodable, Sendable {
        let data: Data
        let eof: Bool

        enum CodingKeys: String, CodingKey {
            case data = "buf-b64"
            case eof
        }
    }

    struct Exec: Encodable, Sendable {
        let path: String
        let arguments: [String]
        /// Replaces the agent's environment when given.
        let environment: [String]?
        let input: Data?
        let captureOutput: Bool

        enum CodingKeys: String, CodingKey {
            case path
            case arguments = "arg"
            case environment = "env"
            case input = "input-data"
            case captureOutput = "capture-output"
        }
    }

    struct ExecStarted: Decodable, Sendable {
        let pid: Int
    }

    struct ExecPID: Encodable, Sendable {
        let pid: Int
    }

    /// The reply of `guest-exec-status`: the output members come only once the process exited.
    struct ExecStatus: Decodable, Sendable {
        let exited: Bool
        let exitCode: Int32?
        let signal: Int32?
        let output: Data?
        let errorOutput: Data?
        let outputTruncated: Bool?
        let errorOutputTruncated: Bool?

        enum CodingKeys: String, CodingKey {
            case exited, signal
            case exitCode = "exitcode"
            case output = "out-data"
            case errorOutput = "err-data"
            case outputTruncated = "out-truncated"
            case errorOutputTruncated = "err-truncated"
        }

        var result: GuestExecResult {
            GuestExecResult(
                exitCode: exitCode, signal: signal, standardOutput: Array(output ?? Data()),
                standardError: Array(errorOutput ?? Data()),
                outputTruncated: outputTruncated == true || errorOutputTruncated == true)
        }
    }
}
