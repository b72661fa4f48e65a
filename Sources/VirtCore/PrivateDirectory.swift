import Glibc

/// Directories only the current user can enter (mode 0700, from `mkdtemp`), for instance state:
/// sockets, overlays and logs must not be reachable by other users.
public enum PrivateDirectory {
    /// Creates `parent/prefixXXXXXX` and returns its path.
    public static func make(in parent: String, prefix: String) throws(VirtError) -> String {
        var template = Array("\(parent)/\(prefix)XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer -> String? in
            guard let base = buffer.baseAddress, let result = mkdtemp(base) else { return nil }
            return String(cString: result)
        }
        guard let made else {
            throw VirtError(.io, "cannot create a directory in \(parent)", errno: errno)
        }
        return made
    }

    /// $TMPDIR, or /tmp.
    public static var temporaryParent: String {
        getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
    }
}
