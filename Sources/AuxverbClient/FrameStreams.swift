import Glibc
import GuestChannel
import Synchronization
import SystemPackage

/// What both ways of running a command share (through the server's relay socket,
/// ``AuxverbClient``, and through a runner such as `incus exec`, ``FramedExec``): stdin sent as
/// frames, the command's output and exit received as frames, signals forwarded, one thread each.
enum FrameStreams {
    /// How receiving ended.
    enum Received {
        /// The exit frame came.
        case end(CommandEnd)
        /// The stream ended (or failed) before it did.
        case lost
        /// Bytes that are no frame: the other side is broken.
        case protocolError(String)
    }

    /// Reads frames from `fd` until the exit frame, writing the command's stdout and stderr to
    /// ours. `afterOutput` runs after each output frame is handled (with its kind and size; a
    /// stdout frame once our stdout is gone is dropped, and counts the same); stdin credit
    /// granted by the other side goes to `credit`.
    ///
    /// Once our stdout is gone, `stdoutGone` runs once, on a thread of its own (it is to close
    /// the command's stdout, as our reader's going closed ours): sending needs the stdin pump's
    /// lock, which it may hold until the other side reads again, which needs this thread
    /// reading on.
    static func receive(
        from fd: Int32, bufferSize: Int, credit: StdinCredit? = nil, stdoutGone: @escaping @Sendable () -> Void,
        afterOutput: (Frame.Kind, Int) -> Void = { _, _ in }
    ) -> Received {
        var decoder = FrameDecoder()
        var buffer = [UInt8](repeating: 0, count: bufferSize)
        var stdoutBroken = false
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return .lost }
            decoder.append(buffer[0..<count])
            while true {
                let frame: Frame?
                do {
                    frame = try decoder.next()
                } catch {
                    return .protocolError("\(error)")
                }
                guard let frame else { break }
                switch frame.kind {
                case .stdout, .stderr:
                    let target: Int32 = frame.kind == .stdout ? 1 : 2
                    if !stdoutBroken || target == 2, !writeAll(target, frame.payload), target == 1 {
                        stdoutBroken = true
                        startThread(stdoutGone)
                    }
                    afterOutput(frame.kind, frame.payload.count)
                case .stdinCredit:
                    credit?.add(frame.countValue)
                case .exit:
                    return .end(CommandEnd(payload: frame.payload))
                default:
                    continue
                }
            }
        }
    }

    /// Sends our stdin as frames, `chunk` bytes at most each (and no more than `credit` allows,
    /// when there is one), then the end of stdin.
    static func pumpStandardInput(into output: FrameOutput, chunk: Int, credit: StdinCredit? = nil) {
        var buffer = [UInt8](repeating: 0, count: chunk)
        while true {
            let allowed = credit?.wait(upTo: chunk) ?? chunk
            let count = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, allowed) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 {
                output.send(Frame(.stdinEOF))
                return
            }
            credit?.use(count)
            guard output.send(Frame(.stdin, Array(buffer[0..<count]))) else { return }
        }
    }

    /// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and so in every thread started after
    /// it) and returns them as a set for ``forwardSignals(_:_:)``: they are taken by one thread
    /// with sigwait, so no thread ever runs a handler.
    static func blockForwardedSignals() -> sigset_t {
        var forwarded = sigset_t()
        sigemptyset(&forwarded)
        for number in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&forwarded, number) }
        pthread_sigmask(SIG_BLOCK, &forwarded, nil)
        return forwarded
    }

    /// The frame that sends the command `signal`.
    static func kill(_ signal: Int32) -> Frame { Frame(.kill, Array("\(signal)".utf8)) }

    /// Takes the signals of `set` for ever (call it on a thread of its own), each passed to
    /// `deliver`.
    static func forwardSignals(_ set: sigset_t, _ deliver: (Int32) -> Void) {
        var set = set
        while true {
            var number: Int32 = 0
            guard sigwait(&set, &number) == 0 else { return }
            deliver(number)
        }
    }

    /// Reports an auxverb failure on stderr; returns 255, the status that says so.
    static func fail(_ message: String) -> Int32 {
        _ = writeAll(2, Array("debusine-virt auxverb: \(message)\n".utf8))
        return 255
    }

    static func errorText() -> String { String(cString: strerror(errno)) }

    @discardableResult
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        (try? FileDescriptor(rawValue: fd).writeAll(bytes)) != nil
    }

    /// Runs `body` on a detached thread.
    static func startThread(_ body: @escaping @Sendable () -> Void) {
        final class Box: Sendable {
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

/// Frames written whole by several threads to one descriptor, which is closed once; nothing is
/// written after that.
final class FrameOutput: Sendable {
    private let descriptor: Mutex<Int32?>

    init(fd: Int32) { descriptor = Mutex(fd) }

    @discardableResult
    func send(_ frame: Frame) -> Bool {
        descriptor.withLock { fd in
            guard let fd else { return false }
            return FrameStreams.writeAll(fd, frame.encoded)
        }
    }

    func close() {
        descriptor.withLock { fd in
            if let open = fd { _ = Glibc.close(open) }
            fd = nil
        }
    }
}

/// The stdin credit the other side has granted (the server's relay grants it; a runner's
/// pipe needs none). A condition variable because the pump waits for credit, which `Mutex`
/// cannot.
final class StdinCredit: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var changed = pthread_cond_t()
    private var available = Frame.window

    init() {
        pthread_mutex_init(&lock, nil)
        pthread_cond_init(&changed, nil)
    }

    /// Blocks until some credit is there; returns how much may be read now (at most `limit`).
    func wait(upTo limit: Int) -> Int {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        while available <= 0 { pthread_cond_wait(&changed, &lock) }
        return min(limit, available)
    }

    func use(_ count: Int) {
        pthread_mutex_lock(&lock)
        available -= count
        pthread_mutex_unlock(&lock)
    }

    func add(_ count: Int) {
        pthread_mutex_lock(&lock)
        available += count
        pthread_cond_signal(&changed)
        pthread_mutex_unlock(&lock)
    }
}
