import CommandRunner
import Foundation
import VirtCore

/// Small disk images made in a test's private directory with sfdisk, mkfs.vfat and qemu-img,
/// good and bad, to show what the image inspection accepts and refuses. Each sfdisk script is a
/// constant of the caller; nothing here goes through a shell.
public enum TestDisks {
    static let runner = SubprocessRunner()

    /// The sfdisk scripts the tests use.
    public enum Layout: Sendable {
        /// A GPT with one Linux partition: no EFI system partition.
        case gptWithoutESP
        /// A GPT with an EFI system partition (sectors 2048-32767) and a Linux one.
        case gptWithESP
        /// An MBR with one partition of type 0xef.
        case mbrWithESP
        /// An MBR with one Linux (0x83) partition.
        case mbrWithoutESP

        var script: String {
            switch self {
            case .gptWithoutESP: return "label: gpt\n,,L\n"
            case .gptWithESP: return "label: gpt\nstart=2048, size=30720, type=U\n,,L\n"
            case .mbrWithESP: return "label: dos\nstart=2048, type=ef\n"
            case .mbrWithoutESP: return "label: dos\nstart=2048, type=83\n"
            }
        }
    }

    /// A raw disk of `size` bytes (sparse, zeros) partitioned as `layout`. With `fatOnESP`, the
    /// EFI system partition of ``Layout/gptWithESP`` gets an empty FAT file system: a disk the
    /// inspection accepts and the firmware still finds nothing to boot on. With `bootCode`, the
    /// MBR's boot code is an endless loop (`jmp $`), which a BIOS runs.
    public static func raw(
        _ path: String, size: Int = 40 << 20, layout: Layout?, fatOnESP: Bool = false, bootCode: Bool = false
    ) async throws {
        try await runner.check(Command("truncate", ["--size=\(size)", "--", path]))
        guard let layout else { return }
        try await runner.check(Command("sfdisk", ["--quiet", "--", path]), input: .bytes(Array(layout.script.utf8)))
        if bootCode {
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
            defer { try? handle.close() }
            try handle.write(contentsOf: Data([0xEB, 0xFE]))
        }
        if fatOnESP {
            // The partition starts at sector 2048 and holds 30720 sectors: 15360 KiB blocks.
            try await runner.check(Command("mkfs.vfat", ["--offset", "2048", path, "15360"]))
        }
    }

    /// `qemu-img convert` of a raw disk into qcow2.
    public static func qcow2(from raw: String, to path: String) async throws {
        try await runner.check(Command("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, path]))
    }

    /// A qcow2 whose backing file is `backing` (a host path, or a `json:` specification) read as
    /// `format`; `-u` so that qemu-img does not open it while creating.
    public static func qcow2(_ path: String, backing: String, format: String = "raw", size: String = "40M") async throws
    {
        try await runner.check(
            Command("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-F", format, "-b", backing, path, size]))
    }

    /// A qcow2 with an external data file at `dataFile` (qemu-img creates that file).
    public static func qcow2(_ path: String, dataFile: String, size: String = "40M") async throws {
        try await runner.check(
            Command("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "data_file=\(dataFile)", path, size]))
    }

    /// `size` random bytes with a GPT holding an EFI system partition, for tests that move
    /// images around and compare their bytes (the inspection only reads the table).
    public static func randomWithESP(_ path: String, size: Int) async throws -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<size).map { _ in UInt8.random(in: 0...255, using: &generator) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let script = "label: gpt\nfirst-lba: 34\nstart=40, size=64, type=U\n"
        try await runner.check(Command("sfdisk", ["--quiet", "--", path]), input: .bytes(Array(script.utf8)))
        return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }
}
