import Glibc

/// Reading the small text files the servers consult (a digest, a manifest, /proc/cpuinfo)
/// without Foundation, and without reading more than a bound from a file that grew.
public enum SmallFile {
    /// The file's first `limit` bytes as text; nil when it cannot be opened.
    public static func text(_ path: String, limit: Int = 1 << 20) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: min(limit, 65536))
        while bytes.count < limit {
            let wanted = min(buffer.count, limit - bytes.count)
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, wanted) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            bytes += buffer[0..<count]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The file's first line, without its newline; nil when it cannot be opened or is empty.
    public static func firstLine(_ path: String) -> String? {
        guard let text = text(path, limit: 4096), !text.isEmpty else { return nil }
        return String(text.prefix { $0 != "\n" })
    }
}
