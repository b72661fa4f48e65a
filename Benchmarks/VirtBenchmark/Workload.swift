import Foundation
import VirtCore

/// How much work one benchmark run does: the same for every server compared.
public struct Workload: Codable, Sendable, Equatable {
    public var repetitions = 3
    /// Auxverb calls of `true` per repetition.
    public var auxverbCalls = 50
    /// Bytes streamed through the auxverb's stdin and stdout each way.
    public var streamBytes = 256 << 20
    /// Size of the one-file copy each way.
    public var copyBytes = 256 << 20
    /// Files in the copied tree.
    public var treeFiles = 2000
    /// Longest any one step may take before the run fails, in seconds.
    public var stepTimeoutSeconds = 1800
    /// Capabilities not exercised even when the server advertises them (`revert`, `reboot`),
    /// for a server whose implementation cannot work on this machine.
    public var skipped: [String] = []

    public init() {}
}

/// The host side of the workload: random files and a tree of small files with awkward names,
/// made once per run in a private directory.
struct HostFiles {
    let directory: String
    var stream: String { directory + "/stream.bin" }
    var copy: String { directory + "/copy.bin" }
    /// A space and UTF-8 in the root's name too, so the protocol line needs encoding.
    var tree: String { directory + "/tree ü ✓" }
    var back: String { directory + "/back" }

    static func make(in directory: String, workload: Workload) throws(VirtError) -> HostFiles {
        let files = HostFiles(directory: directory)
        try writeRandom(files.stream, bytes: workload.streamBytes)
        try writeRandom(files.copy, bytes: workload.copyBytes)
        try makeTree(files.tree, count: workload.treeFiles)
        return files
    }

    /// `count` files of 1 byte to 4 KiB in directories of 100, with spaces, UTF-8 and a
    /// leading dash in their names.
    static func makeTree(_ root: String, count: Int) throws(VirtError) {
        var generator = SplitMix(seed: 42)
        for index in 0..<count {
            let directory = "\(root)/dir \(index / 100) – ünïcødé"
            if index % 100 == 0 { try makeDirectory(directory) }
            let size = Int(generator.next() % 4096) + 1
            var bytes = [UInt8](repeating: 0, count: size)
            for position in bytes.indices { bytes[position] = UInt8(truncatingIfNeeded: generator.next()) }
            try write(bytes, to: "\(directory)/-file \(index) ✓ naïve.txt")
        }
        if count == 0 { try makeDirectory(root) }
    }

    private static func makeDirectory(_ path: String) throws(VirtError) {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw VirtError(.io, "cannot create \(path): \(error.localizedDescription)")
        }
    }

    private static func write(_ bytes: [UInt8], to path: String) throws(VirtError) {
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
            throw VirtError(.io, "cannot write \(path)")
        }
    }

    /// `bytes` bytes from /dev/urandom, so that no transport can compress them away.
    static func writeRandom(_ path: String, bytes: Int) throws(VirtError) {
        let source = Glibc.open("/dev/urandom", O_RDONLY | O_CLOEXEC)
        let target = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer {
            if source >= 0 { Glibc.close(source) }
            if target >= 0 { Glibc.close(target) }
        }
        guard source >= 0, target >= 0 else {
            throw VirtError(.io, "cannot write \(path)", errno: errno)
        }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var left = bytes
        while left > 0 {
            let wanted = min(left, buffer.count)
            let got = buffer.withUnsafeMutableBytes { Glibc.read(source, $0.baseAddress, wanted) }
            guard got > 0 else { throw VirtError(.io, "cannot read /dev/urandom") }
            var offset = 0
            while offset < got {
                let written = buffer.withUnsafeBytes {
                    Glibc.write(target, $0.baseAddress.map { $0 + offset }, got - offset)
                }
                guard written > 0 else {
                    throw VirtError(.io, "cannot write \(path)", errno: errno)
                }
                offset += written
            }
            left -= got
        }
    }
}

/// A small deterministic generator (SplitMix64): the tree is the same for every server and
/// every run, and a fuzzing seed can be replayed.
public struct SplitMix: Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
