import Foundation
import VirtCore

/// Plain blocking unix sockets for tests that play QEMU's, the agent's or the helper's side, so
/// that they share nothing with the NIO code under test.
public enum TestSockets {
    /// A socket listening at `path`, close-on-exec, and non-blocking when asked.
    public static func listen(at path: String, nonBlocking: Bool = false) throws -> Int32 {
        let flags = Int32(SOCK_CLOEXEC.rawValue) | (nonBlocking ? Int32(SOCK_NONBLOCK.rawValue) : 0)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | flags, 0)
        guard fd >= 0 else { throw VirtError(.io, "socket", errno: errno) }
        let bound = UnixSocketAddress.with(path) { bind(fd, $0, $1) }
        if bound == nil { errno = ENAMETOOLONG }
        guard bound == 0, Glibc.listen(fd, 8) == 0 else {
            let failure = VirtError(.io, "cannot listen on \(path)", errno: errno)
            close(fd)
            throw failure
        }
        return fd
    }

    /// A blocking connection to `path`, close-on-exec.
    public static func connect(to path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw VirtError(.io, "socket", errno: errno) }
        guard UnixSocketAddress.connect(fd, to: path) == 0 else {
            let failure = VirtError(.io, "cannot connect to \(path)", errno: errno)
            close(fd)
            throw failure
        }
        return fd
    }
}
