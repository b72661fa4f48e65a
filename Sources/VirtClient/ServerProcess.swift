import CommandRunner
import Foundation
import Synchronization
import VirtCore

/// A server started as a real child process, driven like autopkgtest drives one: requests on a
/// pipe to its stdin, replies read line by line from a pipe on its stdout, stderr collected.
public final class ServerProcess: Sendable {
    public let pid: pid_t
    private let input: Mutex<Int32>
    private let replies: ReplyQueue
    private let errorBytes: ByteSink
    private let exitStatus: ExitWaiter

    /// Writing to a server that has exited must be an error here, not the client's death.
    private static let ignoreSIGPIPE: Void = { _ = Glibc.signal(SIGPIPE, SIG_IGN) }()

    /// Starts `argv` (argv[0] a path) with `environment` added to ours, in `workingDirectory`
    /// (ours when nil).
    public init(_ argv: [String], environment: [String: String] = [:], workingDirectory: String? = nil) throws {
        Self.ignoreSIGPIPE
        guard let stdinEnds = SpawnHygiene.pipe(), let stdoutEnds = SpawnHygiene.pipe(),
            let stderrEnds = SpawnHygiene.pipe()
        else {
            throw VirtError(.io, "pipe failed")
        }
        // dup2 onto 0, 1 and 2 clears close-on-exec there; every other end stays ours.
        let stdinPipe = [stdinEnds.read, stdinEnds.write]
        let stdoutPipe = [stdoutEnds.read, stdoutEnds.write]
        let stderrPipe = [stderrEnds.read, stderrEnds.write]

        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        let child: pid_t
        do {
            child = try Spawn.start(
                argv,
                actions: [
                    .duplicate(stdinPipe[0], onto: 0), .duplicate(stdoutPipe[1], onto: 1),
                    .duplicate(stderrPipe[1], onto: 2),
                ], environment: env.map { "\($0.key)=\($0.value)" }, workingDirectory: workingDirectory)
        } catch {
            for fd in stdinPipe + stdoutPipe + stderrPipe { close(fd) }
            throw error
        }
        close(stdinPipe[0])
        close(stdoutPipe[1])
        close(stderrPipe[1])
        pid = child
        input = Mutex(stdinPipe[1])
        replies = ReplyQueue(fd: stdoutPipe[0])
        let errorBytes = ByteSink()
        self.errorBytes = errorBytes
        let stderrFD = stderrPipe[0]
        Thread {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = buffer.withUnsafeMutableBytes { read(stderrFD, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { break }
                errorBytes.bytes.withLock { $0.append(contentsOf: buffer[0..<count]) }
            }
            close(stderrFD)
            errorBytes.closed.set(())
        }.start()
        exitStatus = ExitWaiter(pid: child)
    }

    /// Writes raw bytes to the server's stdin; false when it has gone away.
    @discardableResult
    public func write(_ bytes: [UInt8]) -> Bool {
        input.withLock { fd in
            fd >= 0 && (try? writeAll(fd, bytes, "writing to the server")) != nil
        }
    }

    /// Sends `line` and a newline.
    @discardableResult
    public func write(line: String) -> Bool { write(Array((line + "\n").utf8)) }

    /// Closes the server's stdin (EOF).
    public func closeStandardInput() {
        input.withLock { fd in
            if fd >= 0 { close(fd) }
            fd = -1
        }
    }

    /// The next reply line, nil at end of output; throws after `timeout`, which is how a reply
    /// stuck in a buffer shows up. At the end of output, ``standardError`` is complete too (or
    /// two seconds have passed): a server's last words on stderr come as its stdout ends.
    /// A timeout's error carries the end of the server's stderr: what it was doing when it
    /// stopped answering is what a reader of a failed run needs first.
    public func readLine(timeout: Duration = .seconds(60)) async throws -> String? {
        let next: String?
        do {
            next = try await replies.next(timeout: timeout)
        } catch let error as VirtError where error.code == .timeout {
            throw VirtError(.timeout, "\(error.message); the server's stderr ends:\n\(standardError.suffix(6000))")
        }
        guard let line = next else {
            _ = await standardErrorAtEnd(timeout: .seconds(2))
            return nil
        }
        return line
    }

    /// How the server ended, if it has: a look that does not wait.
    public var endedStatus: ProcessStatus? { exitStatus.endedStatus }

    /// Signals the server unless it has already ended (its pid may belong to another process by then).
    public func signal(_ number: Int32) { exitStatus.signal(number) }

    /// Stops reading the server's stdout, as autopkgtest does before `quit`.
    public func closeReplies() { replies.close() }

    /// Waits for the server to end; kills it and throws after `timeout`. Then ``standardError``
    /// is complete too (or two seconds have passed: something it started may hold it open).
    public func wait(timeout: Duration = .seconds(60)) async throws -> ProcessStatus {
        do {
            let status = try await withTimeout(timeout, "waiting for the server to exit") { [exitStatus] in
                try await exitStatus.status()
            }
            _ = await standardErrorAtEnd(timeout: .seconds(2))
            return status
        } catch {
            exitStatus.signal(SIGKILL)
            throw error
        }
    }

    /// Everything the server wrote on stderr so far.
    public var standardError: String {
        String(decoding: errorBytes.bytes.withLock { $0 }, as: UTF8.self)
    }

    /// Everything the server wrote on stderr, once it has closed it, or `timeout` later (a
    /// process it left behind may hold it open). Its last words come after its stdout ends.
    public func standardErrorAtEnd(timeout: Duration = .seconds(5)) async -> String {
        _ = try? await withTimeout(timeout, "reading the server's stderr") { [errorBytes] in
            try await errorBytes.closed.wait()
        }
        return standardError
    }

    /// A server its client let go of: end of input, as when autopkgtest goes away, and SIGTERM
    /// in case it is stuck where it does not read its input (a test that gave up on it): either
    /// makes it clean up (its QEMU, its instance) and exit, so nothing outlives the client.
    deinit {
        closeStandardInput()
        exitStatus.signal(SIGTERM)
    }
}

/// Bytes collected by a reader thread.
final class ByteSink: Sendable {
    let bytes = Mutex<[UInt8]>([])
    /// Set when the writer closed its end.
    let closed = Latch<Void>()
}

/// Lines arriving from somewhere (a reader thread, an in-process writer), taken in order.
public final class LineQueue: Sendable {
    private let lines = Mailbox<String>()

    public init() {}

    public func push(_ line: String) { lines.push(line) }

    /// No more lines: once the queued ones are taken, ``next(timeout:)`` gives nil.
    public func finish() { lines.finish(throwing: VirtError(.io, "end of the lines")) }

    /// The next line, nil once finished and drained; throws after `timeout`.
    public func next(timeout: Duration) async throws -> String? {
        do {
            return try await lines.next(timeout: timeout, "waiting for a reply line")
        } catch let error as VirtError {
            // The queue's finishing error, as opposed to the time running out.
            if error.code != .timeout && lines.isFinished { return nil }
            throw error
        }
    }
}

/// Reply lines from the server's stdout, read on a thread.
final class ReplyQueue: Sendable {
    let queue = LineQueue()
    private let closing = Mutex(false)
    private let closed = Mutex(false)

    /// Has the reader thread close the read end and waits until it has: closing it from here
    /// would not wake a thread blocked in read(), and the writer only sees EPIPE once no reader
    /// holds the pipe.
    func close() {
        closing.withLock { $0 = true }
        while !closed.withLock({ $0 }) { usleep(1000) }
    }

    init(fd: Int32) {
        Thread { [queue, self] in
            var pending: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let ready = poll(&poller, 1, 50)
                if closing.withLock({ $0 }) { break }
                if ready == 0 || (ready < 0 && errno == EINTR) { continue }
                let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { break }
                for byte in buffer[0..<count] {
                    if byte == UInt8(ascii: "\n") {
                        queue.push(String(decoding: pending, as: UTF8.self))
                        pending.removeAll()
                    } else {
                        pending.append(byte)
                    }
                }
            }
            Glibc.close(fd)
            closed.withLock { $0 = true }
            if !pending.isEmpty { queue.push(String(decoding: pending, as: UTF8.self) + "<no newline>") }
            queue.finish()
        }.start()
    }

    func next(timeout: Duration) async throws -> String? { try await queue.next(timeout: timeout) }
}

/// Waits for the child on a thread, and signals it only while it has not been reaped.
///
/// Once reaped, a pid is free for the kernel to give to any new process (pid_max is 32768 on
/// these machines): a late kill(2) would hit a stranger. So the thread waits without reaping
/// (waitid with WNOWAIT), then reaps under the same lock that ``signal(_:)`` takes.
final class ExitWaiter: Sendable {
    private let pid: pid_t
    private let result = Mutex<ProcessStatus?>(nil)
    private let ended = Latch<ProcessStatus>()

    init(pid: pid_t) {
        self.pid = pid
        Thread { [self] in
            var info = siginfo_t()
            while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR {}
            let status = result.withLock { result -> ProcessStatus in
                var status: Int32 = 0
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                let low = status & 0x7f
                let ended: ProcessStatus = low == 0 ? .exited((status >> 8) & 0xff) : .signaled(low)
                result = ended
                return ended
            }
            ended.set(status)
        }.start()
    }

    /// Sends `number` if the child has not been reaped yet.
    func signal(_ number: Int32) {
        result.withLock { result in
            if result == nil { kill(pid, number) }
        }
    }

    func status() async throws -> ProcessStatus { try await ended.wait() }

    /// The status once the child has been reaped.
    var endedStatus: ProcessStatus? { ended.value }
}
