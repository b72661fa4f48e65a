import Glibc
import GuestChannel
import SystemPackage

/// The program autopkgtest and sbuild execute as the auxverb: runs one command in the testbed
/// through the server's relay socket, streaming stdin, stdout and stderr, and exits with the
/// command's status as the auxverb contract says (``CommandEnd/auxverbStatus``).
///
/// Plain threads and blocking I/O: it is started for every command, so it must start fast and
/// has exactly three streams to move.
public enum AuxverbClient {
    /// Runs `argv` and returns the exit status to end with. Failures of the auxverb itself
    /// (server gone, protocol error) are reported on stderr and give 255.
    public static func run(socketPath: String, argv: [String], terminal: Frame.TerminalSize? = nil) -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        guard !argv.isEmpty else { return fail("no command given") }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return fail("socket: \(errorText())") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            return fail("socket path too long: \(socketPath)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in pathBytes.enumerated() { buffer[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            return fail("cannot reach the testbed at \(socketPath): \(errorText()) (has the virt server ended?)")
        }
        let connection = Connection(fd: fd)
        // Signals are taken by one thread with sigwait, so the others never run a handler.
        var forwarded = sigset_t()
        sigemptyset(&forwarded)
        for number in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&forwarded, number) }
        pthread_sigmask(SIG_BLOCK, &forwarded, nil)

        guard connection.send(.spawn(argv: argv, terminal: terminal)) else {
            return fail("the testbed went away")
        }
        let signalSet = forwarded
        startThread { forwardSignals(signalSet, connection) }
        startThread { pumpStandardInput(connection) }
        return receive(connection)
    }

    /// Reads frames until the command's exit; returns the status to exit with.
    static func receive(_ connection: Connection) -> Int32 {
        var decoder = FrameDecoder()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var stdoutBroken = false
        while true {
            let count = buffer.withUnsafeMutableBytes { read(connection.fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return fail("the connection to the testbed was lost") }
            decoder.append(buffer[0..<count])
            while true {
                let frame: Frame?
                do {
                    frame = try decoder.next()
                } catch {
                    return fail("protocol error from the server: \(error)")
                }
                guard let frame else { break }
                switch frame.kind {
                case .stdout, .stderr:
                    let target: Int32 = frame.kind == .stdout ? 1 : 2
                    if !writeAll(target, frame.payload) && target == 1 && !stdoutBroken {
                        // Our reader went away: the command would get SIGPIPE writing to it.
                        stdoutBroken = true
                        _ = connection.send(Frame(.kill, Array("\(SIGPIPE)".utf8)))
                    }
                    _ = connection.send(.count(.credit, frame.payload.count))
                case .stdinCredit:
                    connection.addStdinCredit(frame.countValue)
                case .exit:
                    let end = CommandEnd(payload: frame.payload)
                    if case .failed(let reason) = end { _ = fail(reason) }
                    return end.auxverbStatus
                default:
                    continue
                }
            }
        }
    }

    static func pumpStandardInput(_ connection: Connection) {
        var buffer = [UInt8](repeating: 0, count: 256 << 10)
        while true {
            let allowed = connection.waitForStdinCredit(upTo: buffer.count)
            let count = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, allowed) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 {
                _ = connection.send(Frame(.stdinEOF))
                return
            }
            connection.useStdinCredit(count)
            guard connection.send(Frame(.stdin, Array(buffer[0..<count]))) else { return }
        }
    }

    static func forwardSignals(_ set: sigset_t, _ connection: Connection) {
        var set = set
        while true {
            var number: Int32 = 0
            guard sigwait(&set, &number) == 0 else { return }
            _ = connection.send(Frame(.kill, Array("\(number)".utf8)))
        }
    }

    static func fail(_ message: String) -> Int32 {
        _ = writeAll(2, Array("debusine-virt auxverb: \(message)\n".utf8))
        return 255
    }

    static func errorText() -> String { String(cString: strerror(errno)) }

    @discardableResult
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        (try? FileDescriptor(rawValue: fd).writeAll(bytes)) != nil
    }

    static func startThread(_ body: @escaping @Sendable () -> Void) {
        final class Box: @unchecked Sendable {
            let body: @Sendable () -> Void
            init(_ body: @escaping @Sendable () -> Void) { self.body = body }
        }
        var thread = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let created = pthread_create(
            &thread, nil,
            { raw in
                guard let raw else { return nil }
                let box = Unmanaged<Box>.fromOpaque(raw).takeRetainedValue()
                box.body()
                return nil
            }, box)
        if created == 0 {
            pthread_detach(thread)
        } else {
            Unmanaged<Box>.fromOpaque(box).release()
        }
    }
}

/// The socket to the server: whole frames written under a lock (three threads write), and the
/// stdin credit the guest has granted.
final class Connection: @unchecked Sendable {
    let fd: Int32
    private var writeLock = pthread_mutex_t()
    private var creditLock = pthread_mutex_t()
    private var creditChanged = pthread_cond_t()
    private var stdinCredit = Frame.window

    init(fd: Int32) {
        self.fd = fd
        pthread_mutex_init(&writeLock, nil)
        pthread_mutex_init(&creditLock, nil)
        pthread_cond_init(&creditChanged, nil)
    }

    func send(_ frame: Frame) -> Bool {
        pthread_mutex_lock(&writeLock)
        defer { pthread_mutex_unlock(&writeLock) }
        return AuxverbClient.writeAll(fd, frame.encoded)
    }

    /// Blocks until some credit is there; returns how much may be read now (at most `limit`).
    func waitForStdinCredit(upTo limit: Int) -> Int {
        pthread_mutex_lock(&creditLock)
        defer { pthread_mutex_unlock(&creditLock) }
        while stdinCredit <= 0 { pthread_cond_wait(&creditChanged, &creditLock) }
        return min(limit, stdinCredit)
    }

    func useStdinCredit(_ count: Int) {
        pthread_mutex_lock(&creditLock)
        stdinCredit -= count
        pthread_mutex_unlock(&creditLock)
    }

    func addStdinCredit(_ count: Int) {
        pthread_mutex_lock(&creditLock)
        stdinCredit += count
        pthread_cond_signal(&creditChanged)
        pthread_mutex_unlock(&creditLock)
    }
}
