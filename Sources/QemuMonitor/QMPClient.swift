import VirtCore

/// An asynchronous QMP event (SHUTDOWN, POWERDOWN, RESET, STOP, VSERPORT_CHANGE, ...).
public struct QMPEvent: Sendable {
    public let name: String
    /// The event's whole line, which ``data(as:)`` decodes.
    let line: [UInt8]

    init(name: String, line: [UInt8]) {
        self.name = name
        self.line = line
    }

    /// The event's "data" member as `Value`; nil when it has none or one of another shape.
    public func data<Value: Decodable>(as type: Value.Type) -> Value? {
        MessageCoding.decoded(EventData<Value>.self, from: line)?.data
    }

    private struct EventData<Value: Decodable>: Decodable {
        let data: Value
    }
}

/// What QEMU says on connecting: `{"QMP": {"version": {"qemu": ...}, "capabilities": [...]}}`.
public struct QMPGreeting: Decodable, Sendable, Equatable {
    /// A QEMU version, e.g. 10.0.2.
    public struct Version: Decodable, Sendable, Equatable {
        public let major: Int
        public let minor: Int
        public let micro: Int
    }

    /// QEMU's version.
    public let version: Version
    /// The capabilities QEMU offers (e.g. "oob"); none is asked for.
    public let capabilities: [String]

    private enum CodingKeys: String, CodingKey { case version, capabilities }
    private enum VersionKeys: String, CodingKey { case qemu }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        version = try container.nestedContainer(keyedBy: VersionKeys.self, forKey: .version)
            .decode(Version.self, forKey: .qemu)
        capabilities = try container.decode([String].self, forKey: .capabilities)
    }

    /// The greeting in `line`; nil when the line is not one.
    static func parse(_ line: [UInt8]) -> QMPGreeting? {
        MessageCoding.decoded(Line.self, from: line)?.qmp
    }

    private struct Line: Decodable {
        let qmp: QMPGreeting
        enum CodingKeys: String, CodingKey { case qmp = "QMP" }
    }
}

/// QEMU Machine Protocol client over a unix socket.
///
/// Every command carries an "id", so commands may run concurrently; replies are matched by id and
/// events arriving in between go to ``events``. When QEMU closes the socket (it quit or died),
/// every pending and later call fails with a ``VirtError/Code/testbedFailure`` error ending in
/// "connection closed".
public actor QMPClient {
    /// The greeting QEMU sent on connecting.
    public nonisolated let greeting: QMPGreeting
    /// Asynchronous events in the order QEMU sent them; finishes when the connection closes.
    /// Meant for a single consumer. Up to ``maximumBufferedEvents`` wait for it; beyond that the
    /// oldest are dropped, so a client nobody listens to does not grow without bound.
    public nonisolated let events: AsyncStream<QMPEvent>
    /// How many unconsumed events ``events`` keeps.
    public static let maximumBufferedEvents = 10_000

    private let connection: LineConnection
    private let eventSink: AsyncStream<QMPEvent>.Continuation
    /// The calls waiting for their replies, by id; each gets its reply's line.
    private var pending: [Int: Mailbox<[UInt8]>] = [:]
    private var nextID = 1
    private var closedError: VirtError?
    private var reader: Task<Void, Never>?

    private init(connection: LineConnection, greeting: QMPGreeting) {
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
            // QEMU can queue an event emitted before anyone connected (RESUME, as the VM starts)
            // ahead of the greeting it sends a client that connects late: such events are kept
            // for ``events``, in order; anything else first is not QMP.
            var early: [[UInt8]] = []
            let greeting: QMPGreeting
            while true {
                let line = try await withTimeout(clock.now.duration(to: deadline), "QMP greeting on \(path)") {
                    try await connection.lines.next()
                }
                if let parsed = QMPGreeting.parse(line) {
                    greeting = parsed
                    break
                }
                guard MessageCoding.decoded(Header.self, from: line)?.event != nil, early.count < 64 else {
                    throw VirtError(
                        .testbedFailure, "QMP \(path): expected a greeting, got \(MessageCoding.excerpt(line))")
                }
                early.append(line)
            }
            let client = QMPClient(connection: connection, greeting: greeting)
            for line in early { await client.dispatch(line) }
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

    /// Runs `command` with `arguments` and returns its "return" value as `Value` (``Nothing``
    /// when the caller needs none of it). A QMP error reply becomes a
    /// ``VirtError/Code/testbedFailure`` error "QMP <command>: <class>: <desc>", and so does a
    /// reply of another shape; no reply within `timeout` is a ``VirtError/Code/timeout`` error (a
    /// late reply is then dropped).
    @discardableResult
    public func execute<Arguments: Encodable & Sendable, Value: Decodable & Sendable>(
        _ command: String,
        arguments: Arguments? = Nothing?.none,
        returning: Value.Type = Nothing.self,
        timeout: Duration = .seconds(30)
    ) async throws(VirtError) -> Value {
        if let closedError { throw closedError }
        let id = nextID
        nextID += 1
        let line = try Request(execute: command, arguments: arguments, id: id).line()
        let slot = Mailbox<[UInt8]>()
        pending[id] = slot
        defer { pending[id] = nil }
        let connection = connection
        let reply = try await withTimeout(timeout, "QMP \(command)") {
            try await connection.send(line)
            return try await slot.next()
        }
        return try Reply<Value>.value(of: reply, "QMP \(command)")
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
        guard let header = MessageCoding.decoded(Header.self, from: line) else {
            log.debug("QMP: ignoring a line that is not a JSON object: \(MessageCoding.excerpt(line))")
            return
        }
        if let name = header.event {
            log.debug("QMP event \(name)")
            eventSink.yield(QMPEvent(name: name, line: line))
        } else if let id = header.id, let slot = pending.removeValue(forKey: id) {
            slot.push(line)
        } else {
            // A reply to a call that timed out, or an error about a line QEMU could not parse.
            log.debug("QMP: ignoring unexpected message \(MessageCoding.excerpt(line))")
        }
    }

    /// What routes a line: an event's name, or the id of the call a reply answers. Members of
    /// another type count as absent: an id QEMU echoes from a request it could not parse is not
    /// one of ours.
    private struct Header: Decodable {
        let event: String?
        let id: Int?

        enum CodingKeys: String, CodingKey { case event, id }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            event = try? container.decodeIfPresent(String.self, forKey: .event)
            id = try? container.decodeIfPresent(Int.self, forKey: .id)
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
