import VirtCore

/// An asynchronous QMP event (SHUTDOWN, POWERDOWN, RESET, STOP, ...).
public struct QMPEvent: Sendable, Equatable {
    public let name: String
    /// The event's "data" member; `.null` for events that have none.
    public let data: JSONValue

    public init(name: String, data: JSONValue = .null) {
        self.name = name
        self.data = data
    }
}

/// QEMU Machine Protocol client over a unix socket.
///
/// Every command carries an "id", so commands may run concurrently; replies are matched by id and
/// events arriving in between go to ``events``. When QEMU closes the socket (it quit or died),
/// every pending and later call fails with a ``VirtError/Code/testbedFailure`` error ending in
/// "connection closed".
public actor QMPClient {
    /// The greeting QEMU sent on connecting, e.g. `{"QMP": {"version": ..., "capabilities": [...]}}`.
    public nonisolated let greeting: JSONValue
    /// Asynchronous events in the order QEMU sent them; finishes when the connection closes.
    /// Meant for a single consumer. Up to ``maximumBufferedEvents`` wait for it; beyond that the
    /// oldest are dropped, so a client nobody listens to does not grow without bound.
    public nonisolated let events: AsyncStream<QMPEvent>
    /// How many unconsumed events ``events`` keeps.
    public static let maximumBufferedEvents = 10_000

    private let connection: LineConnection
    private let eventSink: AsyncStream<QMPEvent>.Continuation
    private var pending: [Int: Mailbox<JSONValue>] = [:]
    private var nextID = 1
    private var closedError: VirtError?
    private var reader: Task<Void, Never>?

    private init(connection: LineConnection, greeting: JSONValue) {
        self.connection = connection
        self.greeting = greeting
        (events, eventSink) = AsyncStream.makeStream(
            of: QMPEvent.self, bufferingPolicy: .bufferingNewest(Self.maximumBufferedEvents))
    }

    deinit {
        reader?.cancel()
        eventSink.finish()
    }

    /// Connects (retrying until the socket exists and accepts, up to `timeout`), reads the
    /// greeting and negotiates capabilities, all within `timeout`.
    public static func connect(path: String, timeout: Duration) async throws(VirtError) -> QMPClient {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        let connection = try await LineConnection.connect(path: path, name: "QMP \(path)", timeout: timeout)
        do throws(VirtError) {
            let line = try await withTimeout(clock.now.duration(to: deadline), "QMP greeting on \(path)") {
                try await connection.lines.next()
            }
            let greeting = try JSONValue(parsing: line)
            guard greeting["QMP"] != nil else {
                throw VirtError(.testbedFailure, "QMP \(path): expected a greeting, got \(greeting)")
            }
            let client = QMPClient(connection: connection, greeting: greeting)
            await client.startReading()
            // QEMU has answered: a starved host that used the whole timeout up to the greeting
            // still gets a few seconds for the negotiation rather than none.
            _ = try await client.execute(
                "qmp_capabilities", timeout: max(clock.now.duration(to: deadline), .seconds(5)))
            return client
        } catch {
            await connection.close()
            throw error
        }
    }

    /// Runs `command` and returns its "return" value. A QMP error reply becomes a
    /// ``VirtError/Code/testbedFailure`` error "QMP <command>: <class>: <desc>"; no reply within
    /// `timeout` is a ``VirtError/Code/timeout`` error (a late reply is then dropped).
    public func execute(
        _ command: String,
        arguments: [String: JSONValue]? = nil,
        timeout: Duration = .seconds(30)
    ) async throws(VirtError) -> JSONValue {
        if let closedError { throw closedError }
        let id = nextID
        nextID += 1
        var request: [String: JSONValue] = ["execute": .string(command), "id": JSONValue(id)]
        if let arguments { request["arguments"] = .object(arguments) }
        let line = JSONValue.object(request).serializedBytes + [0x0A]
        let slot = Mailbox<JSONValue>()
        pending[id] = slot
        defer { pending[id] = nil }
        let connection = connection
        let reply = try await withTimeout(timeout, "QMP \(command)") {
            try await connection.send(line)
            return try await slot.next()
        }
        return try unwrapReply(reply, command: "QMP \(command)")
    }

    /// Closes the connection; pending calls fail and ``events`` finishes.
    public func close() async {
        if closedError == nil { closedError = connection.closedError }
        await connection.close()
        await reader?.value
    }

    private func startReading() {
        let connection = connection
        reader = Task { [weak self] in
            while true {
                let line: [UInt8]
                do {
                    line = try await connection.lines.next()
                } catch {
                    await self?.connectionEnded()
                    return
                }
                guard let self else { return }
                await self.dispatch(line)
            }
        }
    }

    private func dispatch(_ line: [UInt8]) {
        let message: JSONValue
        do {
            message = try JSONValue(parsing: line)
        } catch {
            log.debug("QMP: ignoring a line that is not JSON: \(String(decoding: line.prefix(200), as: UTF8.self))")
            return
        }
        if let name = message["event"]?.stringValue {
            log.debug("QMP event \(name)")
            eventSink.yield(QMPEvent(name: name, data: message["data"] ?? .null))
        } else if let id = message["id"]?.intValue, let slot = pending.removeValue(forKey: id) {
            slot.push(message)
        } else {
            // A reply to a call that timed out, or an error about a line QEMU could not parse.
            log.debug("QMP: ignoring unexpected message \(message.serialized.prefix(200))")
        }
    }

    private func connectionEnded() {
        let error = connection.closedError
        if closedError == nil { closedError = error }
        for slot in pending.values { slot.finish(throwing: error) }
        pending.removeAll()
        eventSink.finish()
    }
}

/// Unwraps a reply: its "return" value, or its "error" as a ``VirtError/Code/testbedFailure``
/// error "<what>: <class>: <desc>". QMP and QGA share this shape.
func unwrapReply(_ reply: JSONValue, command what: String) throws(VirtError) -> JSONValue {
    if let error = reply["error"] {
        let errorClass = error["class"]?.stringValue ?? "Error"
        let text = error["desc"]?.stringValue ?? error.serialized
        throw VirtError(.testbedFailure, "\(what): \(errorClass): \(text)")
    }
    guard let value = reply["return"] else {
        throw VirtError(.testbedFailure, "\(what): unexpected reply \(reply.serialized.prefix(200))")
    }
    return value
}
