import Glibc

/// A unix socket's path as the `sockaddr_un` that `connect` and `bind` take.
public enum UnixSocketAddress {
    /// Calls `body` with `path` as a socket address; nil when the path does not fit in one
    /// (107 bytes and the NUL).
    public static func with<T>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    /// `connect(fd, path)`: 0, or -1 with errno set (ENAMETOOLONG for a path too long for an
    /// address).
    public static func connect(_ fd: Int32, to path: String) -> Int32 {
        guard let result = with(path, { Glibc.connect(fd, $0, $1) }) else {
            errno = ENAMETOOLONG
            return -1
        }
        return result
    }
}
