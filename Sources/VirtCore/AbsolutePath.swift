import Glibc

/// Paths given relative to the working directory, made absolute at the moment that counts.
public enum AbsolutePath {
    /// The working directory, nil when it cannot be found (removed, too long).
    public static func workingDirectory() -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return nil }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `path` itself when absolute, else the working directory joined with it (a trailing `/`
    /// kept); nil when the working directory cannot be found.
    public static func resolving(_ path: String) -> String? {
        if path.hasPrefix("/") { return path }
        guard let directory = workingDirectory() else { return nil }
        return directory == "/" ? "/" + path : directory + "/" + path
    }

    /// `path` with every symbolic link resolved (realpath(3)), or as it is when that fails.
    public static func real(_ path: String) -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        return realpath(path, &buffer) != nil ? String(nulTerminated: buffer) : path
    }

    /// ``resolving(_:)``, or `path` as it is when the working directory cannot be found: for
    /// paths that are used at once, which then fail with the path as the user gave it.
    public static func of(_ path: String) -> String { resolving(path) ?? path }
}
