import CommandRunner
import Foundation
import Synchronization
import Testing
import VirtCore
import VirtTestSupport

@testable import QemuMonitor

/// A unix-socket server in a private directory that accepts one client and lets a test play
/// QEMU's or the agent's side of the conversation line by line.
///
/// It uses plain blocking sockets on its own threads, not NIO, so it shares nothing with the code
/// under test and never occupies the (two-thread) cooperative pool.
final class FakePeer: Sendable {
    let directory: String
    let path: String
    /// Lines the client sent, without their newline; finished when the client disconnects.
    let received = Mailbox<[UInt8]>()
    private let listener: Int32
    private let client = Mutex<Int32>(-1)
    private let connected = Mailbox<Void>()
    private let threadEnded = Mailbox<Void>()

    init() throws {
        directory = try PrivateDirectory.make(in: "/tmp", prefix: "qemumonitor-test-")
        path = directory + "/sock"
        do {
            listener = try TestSockets.listen(at: path)
        } catch {
            rmdir(directory)
            throw error
        }
        Thread { [self] in
            defer { threadEnded.push(()) }
            var fd: Int32
            repeat { fd = accept(listener, nil, nil) } while fd < 0 && errno == EINTR
            guard fd >= 0 else {
                received.finish(throwing: VirtError(.io, "fake peer: no client connected"))
                return
            }
            client.withLock { $0 = fd }
            connected.push(())
            FakePeer.readLines(from: fd, into: received)
        }.start()
    }

    private static func readLines(from fd: Int32, into received: Mailbox<[UInt8]>) {
        var pending: [UInt8] = []
        var scanned = 0
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            pending.append(contentsOf: buffer[0..<count])
            var lineStart = 0
            while let newline = pending[scanned...].firstIndex(of: 0x0A) {
                received.push(Array(pending[lineStart..<newline]))
                lineStart = newline + 1
                scanned = lineStart
            }
            if lineStart > 0 { pending.removeFirst(lineStart) }
            scanned = pending.count
        }
        received.finish(throwing: VirtError(.io, "fake peer: the client disconnected"))
    }

    /// Waits until the client has connected.
    func waitForClient() async throws {
        try await withTimeout(.seconds(60), "waiting for the client to connect") { try await self.connected.next() }
    }

    /// The next line the client sent, as sent.
    func nextLine() async throws -> [UInt8] {
        try await received.next(timeout: .seconds(60), "waiting for a line from the client")
    }

    /// The next line the client sent, parsed as JSON.
    func nextMessage() async throws -> AnyJSON {
        try AnyJSON(parsing: try await nextLine())
    }

    /// Sends raw bytes to the client; false when it is not connected.
    @discardableResult
    func send(bytes: [UInt8]) -> Bool {
        client.withLock { fd in
            guard fd >= 0 else { return false }
            var offset = 0
            while offset < bytes.count {
                let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress.map { $0 + offset }, $0.count - offset) }
                if written < 0 && errno == EINTR { continue }
                guard written > 0 else { return false }
                offset += written
            }
            return true
        }
    }

    /// Sends `text` and a newline.
    @discardableResult
    func send(_ text: String) -> Bool { send(bytes: Array(text.utf8) + [0x0A]) }

    /// Sends a JSON value on a line.
    @discardableResult
    func send(_ value: AnyJSON) -> Bool { send(bytes: value.serializedBytes + [0x0A]) }

    /// Hangs up on the client, as a dying QEMU would.
    func disconnect() {
        client.withLock { fd in if fd >= 0 { shutdown(fd, Int32(SHUT_RDWR)) } }
    }

    /// Stops both threads' blocking calls, then closes everything and removes the directory.
    func stop() async {
        shutdown(listener, Int32(SHUT_RDWR))
        disconnect()
        do {
            try await withTimeout(.seconds(60), "fake peer shutdown") { try await self.threadEnded.next() }
        } catch {
            Issue.record("the fake peer's thread did not stop: \(error)")
        }
        client.withLock { fd in
            if fd >= 0 { close(fd) }
            fd = -1
        }
        close(listener)
        unlink(path)
        rmdir(directory)
    }
}

/// Runs `body` with a fresh fake peer that is always stopped and removed afterwards.
func withFakePeer<T>(_ body: (FakePeer) async throws -> T) async throws -> T {
    let peer = try FakePeer()
    do {
        let result = try await body(peer)
        await peer.stop()
        return result
    } catch {
        await peer.stop()
        throw error
    }
}

/// A long-running child process started with posix_spawn, its output going to a file; `stop()`
/// (which callers must reach on every path) terminates and reaps it.
final class ChildProcess: Sendable {
    let pid: pid_t
    private let status = Mutex<Int32?>(nil)

    init(_ argv: [String], outputPath: String) throws {
        let child = try Spawn.start(
            argv,
            actions: [
                .open(0, path: "/dev/null", flags: O_RDONLY),
                .open(1, path: outputPath, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600), .duplicate(1, onto: 2),
            ])
        pid = child
    }

    /// The raw wait status once the process has been reaped.
    func poll() -> Int32? {
        status.withLock { status in
            if status == nil {
                var raw: Int32 = 0
                if waitpid(pid, &raw, WNOHANG) == pid { status = raw }
            }
            return status
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit code, or nil.
    func waitForExit(timeout: Duration) async -> Int32? {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while ContinuousClock.now < deadline {
            if let raw = poll() { return raw & 0x7F == 0 ? (raw >> 8) & 0xFF : -(raw & 0x7F) }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return nil
    }

    /// SIGTERM, then SIGKILL if it is still there after two seconds; always reaps.
    func stop() async {
        guard poll() == nil else { return }
        kill(pid, SIGTERM)
        if await waitForExit(timeout: .seconds(2)) != nil { return }
        kill(pid, SIGKILL)
        _ = await waitForExit(timeout: .seconds(60))
    }
}

/// Makes a private directory for one test and removes it afterwards, whatever happens.
func withPrivateDirectory<T>(_ prefix: String, _ body: (String) async throws -> T) async throws -> T {
    // /tmp, not $TMPDIR: socket paths must stay under 108 bytes.
    let directory = try PrivateDirectory.make(in: "/tmp", prefix: prefix)
    func remove() async {
        do {
            try await SubprocessRunner().check(Command("rm", ["-rf", "--", directory]))
        } catch {
            Issue.record("cannot remove \(directory): \(error)")
        }
    }
    do {
        let result = try await body(directory)
        await remove()
        return result
    } catch {
        await remove()
        throw error
    }
}

/// Bytes that will not compress or line up by accident.
func randomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { buffer in
        var offset = 0
        while offset < buffer.count {
            var word = generator.next()
            let length = min(8, buffer.count - offset)
            withUnsafeBytes(of: &word) { wordBytes in
                for index in 0..<length { buffer[offset + index] = wordBytes[index] }
            }
            offset += length
        }
    }
    return bytes
}

/// Whether a host tool exists. In CI (`CI=true`) tests that need it run regardless, so a missing
/// tool is a failure there rather than a silent skip.
func hostToolAvailable(_ path: String) -> Bool {
    access(path, X_OK) == 0 || ProcessInfo.processInfo.environment["CI"] == "true"
}

/// The ``VirtError`` that `body` throws; records an issue when it throws nothing or another type.
func caughtError(
    sourceLocation: SourceLocation = #_sourceLocation, _ body: () async throws -> Void
) async -> VirtError? {
    do {
        try await body()
        Issue.record("expected an error", sourceLocation: sourceLocation)
    } catch let error as VirtError {
        return error
    } catch {
        Issue.record("expected a VirtError, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}
