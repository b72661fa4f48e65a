import Foundation
import VirtCore

/// Where reply lines go. Each line is written and flushed as a whole before `writeLine` returns.
public protocol ReplyWriter: Sendable {
    /// Writes `line` plus a newline. Throws when the reader has gone away.
    func writeLine(_ line: String) throws(VirtError)
}

/// Replies on a file descriptor (stdout), one `write(2)` per line: no buffer to flush, nothing
/// left behind if the process dies. A closed reader surfaces as EPIPE because SIGPIPE is ignored.
public struct FileDescriptorReplyWriter: ReplyWriter {
    public let fd: Int32

    public init(fd: Int32 = 1) { self.fd = fd }

    public func writeLine(_ line: String) throws(VirtError) {
        var bytes = Array(line.utf8)
        bytes.append(UInt8(ascii: "\n"))
        try writeAll(fd, bytes, "cannot write the reply")
    }
}

/// Request lines read from a file descriptor (stdin) on a dedicated thread, because Linux has no
/// asynchronous FileHandle reading. The stream ends at end of file; a last line without a
/// newline is still delivered, as Python's `readline` does.
public enum LineReader {
    /// Longer lines are a client bug; refusing them bounds memory.
    public static let maximumLineLength = 1 << 20

    /// One element of the stream: a line (without its newline), or a reason to stop.
    public enum Event: Sendable, Equatable {
        case line([UInt8])
        case tooLong
        case readError(String)
    }

    public static func lines(fd: Int32 = 0) -> AsyncStream<Event> {
        let (stream, continuation) = AsyncStream.makeStream(of: Event.self, bufferingPolicy: .unbounded)
        let thread = Thread {
            read(fd: fd, into: continuation)
        }
        thread.name = "stdin-reader"
        thread.start()
        return stream
    }

    private static func read(fd: Int32, into continuation: AsyncStream<Event>.Continuation) {
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                continuation.yield(.readError(VirtError.text(errno: errno)))
                break
            }
            if count == 0 { break }
            var start = 0
            for index in 0..<count where buffer[index] == UInt8(ascii: "\n") {
                pending.append(contentsOf: buffer[start..<index])
                continuation.yield(.line(pending))
                pending.removeAll(keepingCapacity: true)
                start = index + 1
            }
            pending.append(contentsOf: buffer[start..<count])
            if pending.count > maximumLineLength {
                continuation.yield(.tooLong)
                break
            }
        }
        if !pending.isEmpty && pending.count <= maximumLineLength {
            continuation.yield(.line(pending))
        }
        continuation.finish()
    }
}
