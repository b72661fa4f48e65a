/// The C library, for every module that imports VirtCore: the servers run on Linux (glibc) only,
/// so this is the one place that says so.
///
/// VirtCore itself stays free of Foundation and NIO: the auxverb, which starts for every
/// command, uses it.
@_exported import Glibc

extension String {
    /// The text a C function wrote into `buffer`, up to its first NUL (or the whole buffer).
    public init(nulTerminated buffer: [CChar]) {
        self.init(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
