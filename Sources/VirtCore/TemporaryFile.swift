import Glibc

/// New files with unique names, for writing under a temporary name and renaming into place.
public enum TemporaryFile {
    /// Creates a new empty file `prefix` + 6 random characters with mode 0600 (mkstemp), closed
    /// on exec, and returns its descriptor and path.
    public static func make(prefix: String) throws(VirtError) -> (fd: Int32, path: String) {
        var template = Array((prefix + "XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { buffer -> Int32 in
            guard let base = buffer.baseAddress else { return -1 }
            return mkstemp(base)
        }
        guard fd >= 0 else {
            throw VirtError(.io, "cannot create a file \(prefix)XXXXXX", errno: errno)
        }
        // Children get what they need explicitly, never this descriptor. (mkostemp, which would
        // set it at once, is not in the Glibc module.)
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return (fd, String(nulTerminated: template))
    }
}
