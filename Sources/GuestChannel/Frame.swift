/// The frames of the guest channel: how the server, the auxverb client and the guest helper
/// multiplex command executions over one byte stream (a virtio-serial port, unix sockets).
///
/// A frame is a 9-byte header, big-endian: channel (UInt32), kind (UInt8), payload length
/// (UInt32); then the payload. Between the auxverb client and the server the channel is 0: the
/// connection is the channel, and the server rewrites ids on the way to and from the guest.
/// The guest helper (GuestHelperScript) implements the same format in Python.
public struct Frame: Sendable, Equatable {
    /// What a frame carries. Values below 0x10 travel towards the guest, the others back.
    public enum Kind: UInt8, Sendable {
        /// Start a command: NUL-separated fields: window, working directory, the number of
        /// environment entries, the `KEY=value` entries, then the argv (see ``Frame/spawn(argv:)``).
        /// A first field of `WINDOW file` asks for one file's content instead of a command
        /// (``Frame/readFile(_:directory:)``).
        case spawn = 0x01
        /// Bytes for the command's stdin.
        case stdin = 0x02
        /// The command's stdin is at end of file.
        case stdinEOF = 0x03
        /// Send the command's process group a signal: the number as decimal text.
        case kill = 0x04
        /// The receiver of stdout/stderr has taken this many more bytes (UInt32): the guest may
        /// send that much more.
        case credit = 0x05
        /// Liveness check; answered by `pong` with the same payload.
        case ping = 0x06
        /// Host to helper, channel 0: the VM was just restored from a saved state. The payload is
        /// the host's real time in nanoseconds since the epoch (UInt64), then random bytes to seed
        /// the guest's generator with. The helper answers with a new `hello`.
        case resumed = 0x07

        /// Bytes the command wrote to stdout.
        case stdout = 0x11
        /// Bytes the command wrote to stderr.
        case stderr = 0x12
        /// The command ended: `code N`, `signal N` or `error TEXT`.
        case exit = 0x13
        /// The guest has written this many stdin bytes (UInt32) to the command.
        case stdinCredit = 0x14
        case pong = 0x15
        /// The helper is up: `BOOT_ID VERSION`, and after a `resumed` what it did: `clock-set`,
        /// `reseeded` or their `...-failed:ERRNO`. Sent once per start, and after each `resumed`.
        case hello = 0x16
    }

    public static let headerSize = 9
    /// No frame carries more; senders split data.
    public static let maximumPayload = 1 << 20
    /// A `spawn` carries a whole argv, which cannot be split: Linux takes up to 6 MiB of
    /// arguments and environment (3/4 of the largest default stack), so this is above that.
    public static let maximumSpawnPayload = 8 << 20
    /// How many unacknowledged bytes of output (and of stdin) may be in flight per command.
    public static let window = 4 << 20

    public var channel: UInt32
    public var kind: Kind
    public var payload: [UInt8]

    public init(channel: UInt32 = 0, _ kind: Kind, _ payload: [UInt8] = []) {
        self.channel = channel
        self.kind = kind
        self.payload = payload
    }

    /// A frame whose payload is a big-endian UInt32 (credits).
    public static func count(channel: UInt32 = 0, _ kind: Kind, _ value: Int) -> Frame {
        let v = UInt32(clamping: value)
        return Frame(
            channel: channel, kind, [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)])
    }

    /// The size of the terminal a command gets instead of pipes (for an interactive shell).
    public struct TerminalSize: Sendable, Equatable {
        public var rows: Int
        public var columns: Int

        public init(rows: Int, columns: Int) {
            self.rows = rows
            self.columns = columns
        }

        /// `ROWSxCOLUMNS`, as the auxverb's `--terminal` option takes it.
        public init?(_ text: String) {
            let parts = text.split(separator: "x")
            guard parts.count == 2, let rows = Int(parts[0]), let columns = Int(parts[1]), rows >= 0, columns >= 0,
                rows < 65536, columns < 65536
            else { return nil }
            self.init(rows: rows, columns: columns)
        }
    }

    /// A spawn request (JSON is not available in the guest's python3-minimal, so plain fields).
    /// With a terminal size the command runs on a new pseudo-terminal in the guest (stdin and
    /// stdout are its master side, there is no separate stderr): the first field is then
    /// `WINDOW pty ROWS COLUMNS`.
    public static func spawn(
        argv: [String], environment: [String] = [], directory: String = "/", terminal: TerminalSize? = nil
    ) -> Frame {
        let head = terminal.map { "\(window) pty \($0.rows) \($0.columns)" } ?? "\(window)"
        let fields = [head, directory, "\(environment.count)"] + environment + argv
        return Frame(.spawn, Array(fields.joined(separator: "\u{0}").utf8))
    }

    /// A spawn request for one file's content as the output (`WINDOW file`, the path as the one
    /// argument, relative to `directory`): the helper sends the file itself, with no command
    /// in between, and ends with status 3 when root may execute it, 0 when not, 1 (and a message)
    /// when it cannot read it. What is neither a regular file nor a directory, or is on a file
    /// system that is not a local one (/proc, NFS, FUSE...), is read by `cat`, with the same statuses.
    public static func readFile(_ path: String, directory: String = "/") -> Frame {
        let fields = ["\(window) file", directory, "0", path]
        return Frame(.spawn, Array(fields.joined(separator: "\u{0}").utf8))
    }

    /// An `exit` frame saying the command could not run or was lost.
    public static func failure(channel: UInt32 = 0, _ reason: String) -> Frame {
        Frame(channel: channel, .exit, Array("error \(reason)".utf8))
    }

    /// The payload read as a big-endian UInt32, for credit frames.
    public var countValue: Int {
        guard payload.count == 4 else { return 0 }
        return payload.reduce(0) { $0 << 8 | Int($1) }
    }

    /// Header and payload as bytes.
    public var encoded: [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(Frame.headerSize + payload.count)
        Frame.appendHeader(channel: channel, kind: kind, length: payload.count, to: &bytes)
        bytes += payload
        return bytes
    }

    public static func appendHeader(channel: UInt32, kind: Kind, length: Int, to bytes: inout [UInt8]) {
        let length = UInt32(length)
        bytes += [
            UInt8(channel >> 24), UInt8(channel >> 16 & 0xFF), UInt8(channel >> 8 & 0xFF), UInt8(channel & 0xFF),
            kind.rawValue,
            UInt8(length >> 24), UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF),
        ]
    }
}

/// Cuts a byte stream into frames.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0

    /// The largest `spawn` accepted: only the host sends them, so a decoder of what the guest
    /// sends takes none larger than any other frame.
    private let spawnLimit: Int

    public init(spawnLimit: Int = Frame.maximumSpawnPayload) {
        self.spawnLimit = spawnLimit
    }

    public enum DecodeError: Error, Equatable {
        case unknownKind(UInt8)
        case oversized(Int)
    }

    public mutating func append<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame, or nil until more bytes arrive.
    public mutating func next() throws(DecodeError) -> Frame? {
        guard buffer.count - start >= Frame.headerSize else { return compact() }
        let header = buffer[start..<(start + Frame.headerSize)]
        let channel = header.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let rawKind = header[start + 4]
        let length = header.suffix(4).reduce(0) { $0 << 8 | Int($1) }
        guard let kind = Frame.Kind(rawValue: rawKind) else { throw .unknownKind(rawKind) }
        let limit = kind == .spawn ? spawnLimit : Frame.maximumPayload
        guard length <= limit else { throw .oversized(length) }
        let end = start + Frame.headerSize + length
        guard buffer.count >= end else { return compact() }
        let frame = Frame(channel: channel, kind, Array(buffer[(start + Frame.headerSize)..<end]))
        start = end
        return frame
    }

    /// Drops consumed bytes once they are the larger part of the buffer; returns nil.
    private mutating func compact() -> Frame? {
        if start > 0 && start * 2 >= buffer.count {
            buffer.removeFirst(start)
            start = 0
        }
        return nil
    }
}

/// How a command ended, as the `exit` frame says.
public enum CommandEnd: Sendable, Equatable {
    case exited(Int32)
    case signaled(Int32)
    /// The command could not run, or the testbed went away under it.
    case failed(String)

    /// The auxverb's own exit status, by the contract autopkgtest relies on: the command's status
    /// for 0...253, a real 255 becomes 253 (254 and 255 mean the auxverb itself failed), a
    /// signal N becomes 128+N (137 is how autopkgtest sees a reboot request).
    public var auxverbStatus: Int32 {
        switch self {
        case .exited(let code): return code == 255 ? 253 : code
        case .signaled(let signal): return 128 + signal
        case .failed: return 255
        }
    }

    /// Parses an `exit` payload.
    public init(payload: [UInt8]) {
        let text = String(decoding: payload, as: UTF8.self)
        let parts = text.split(separator: " ", maxSplits: 1)
        let value = parts.count == 2 ? Int32(parts[1]) : nil
        // The guest end is not trusted: a code past 255 would wrap (256 exits 0) and a signal
        // past 64 (SIGRTMAX) is none, and a large one would overflow 128+N.
        switch (parts.first, value) {
        case ("code", let code?) where (0...255).contains(code): self = .exited(code)
        case ("signal", let signal?) where (1...64).contains(signal): self = .signaled(signal)
        case ("error", _) where parts.count == 2: self = .failed(String(parts[1]))
        default: self = .failed("unreadable exit report: \(text)")
        }
    }
}
