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
        let bound = withAddress(path) { bind(fd, $0, $1) }
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
        guard withAddress(path, { Glibc.connect(fd, $0, $1) }) == 0 else {
            let failure = VirtError(.io, "cannot connect to \(path)", errno: errno)
            close(fd)
            throw failure
        }
        return fd
    }

    /// Calls `body` with `path` as a socket address; paths too long for one are cut, and then
    /// fail in `body` as the kernel sees them.
    private static func withAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in path.utf8.prefix(buffer.count - 1).enumerated() { buffer[index] = byte }
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}
