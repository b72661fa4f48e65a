/// The C library, for every module that imports VirtCore: the servers run on Linux (glibc) only,
/// so this is the one place that says so.
///
/// VirtCore itself stays free of Foundation and NIO: the auxverb, which starts for every
/// command, uses it.
@_exported import Glibc

/// The machine this process runs on.
public enum Host {
    /// `uname -m`: x86_64, aarch64, i686, ... (also Incus's name for the architecture).
    public static var machine: String {
        var name = utsname()
        guard uname(&name) == 0 else { return "" }
        return withUnsafeBytes(of: &name.machine) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }
}

extension String {
    /// The text a C function wrote into `buffer`, up to its first NUL (or the whole buffer).
    public init(nulTerminated buffer: [CChar]) {
        self.init(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Linux constants that glibc defines only for `_GNU_SOURCE`, which Swift's Glibc module does not
/// see; their values are Linux's ABI on every architecture.
public enum LinuxConstants {
    /// lseek(2): to the next data at or after an offset (ENXIO: none before the end).
    public static let seekData: Int32 = 3
    /// lseek(2): to the next hole at or after an offset (the end of the file counts as one).
    public static let seekHole: Int32 = 4
    /// fcntl(2): sets a pipe's capacity.
    public static let setPipeSize: Int32 = 1031
}
