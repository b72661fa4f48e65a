import CommandRunner
import Foundation
import VirtCore

/// The disk image formats QEMU is given explicitly (never probed: probing raw images is unsafe).
public enum DiskFormat: String, Sendable, CaseIterable {
    case qcow2, raw
}

/// The firmware that boots a disk: what `--boot` chooses, or the disk decides (`auto`).
public enum Firmware: String, Sendable, CaseIterable {
    /// UEFI (OVMF, AAVMF): it boots the loader on an EFI system partition.
    case efi
    /// A PC BIOS (SeaBIOS): it runs the boot code in the disk's first sector.
    case bios
}

/// What an inspection checks the disk can boot with.
public enum BootCheck: Sendable, Equatable {
    /// Nothing: the disk is not booted (an extra disk, an import).
    case none
    /// The disk must be bootable by this firmware.
    case firmware(Firmware)
    /// EFI when the disk has an EFI system partition, else BIOS when its first sector has boot
    /// code (a disk made for both boots EFI, as a machine with UEFI would).
    case auto
}

/// A disk image that passed ``ImageInspection``: what QEMU (or Incus) may be given.
public struct InspectedImage: Sendable, Equatable {
    /// The absolute path that was inspected.
    public var path: String
    /// The format qemu-img found: the overlay's `-F`, never probed again.
    public var format: DiskFormat
    /// The size of the disk the guest sees.
    public var virtualSize: Int64
    /// What its first sectors hold; nil when the partitions were not asked about.
    public var partitions: PartitionTable?
    /// The firmware that boots it; nil when how it boots was not asked about.
    public var firmware: Firmware?

    public init(
        path: String, format: DiskFormat, virtualSize: Int64, partitions: PartitionTable?, firmware: Firmware? = nil
    ) {
        self.path = path
        self.format = format
        self.virtualSize = virtualSize
        self.partitions = partitions
        self.firmware = firmware
    }
}

/// Looks at a disk image before anything boots or imports it, and refuses what must not be:
/// - what reads other files of the host: a backing file (plain path or a `json:` specification,
///   which can also name network block devices) or an external data file. An overlay put over
///   such an image gives the guest those files' bytes;
/// - formats other than raw and qcow2 (vmdk extents, for one, are more host files);
/// - for a boot, what its firmware cannot boot: a file that is not a disk image, a disk without
///   a partition table, for EFI one without an EFI system partition, for BIOS one without boot
///   code in its first sector. These fail in seconds here, instead of the firmware trying the
///   network and the boot timing out minutes later.
///
/// Everything goes through qemu-img, so qcow2 and raw are read alike, and the image is only
/// ever read. Errors have the code ``VirtError/Code/badImage`` and name the image.
public struct ImageInspection: Sendable {
    let runner: any CommandRunner
    /// For each qemu-img run: a local image answers in milliseconds, so this only bounds a file
    /// system that hangs.
    let timeout: Duration

    /// How much of the disk is read for its partition table: a GPT's header and entries, with
    /// 512 or 4096-byte sectors, all lie in the first MiB in practice.
    public static let headBytes = 1 << 20

    public init(runner: any CommandRunner = SubprocessRunner(), timeout: Duration = .seconds(60)) {
        self.runner = runner
        self.timeout = timeout
    }

    /// Inspects the image at `path` (absolute), naming it `name` (what the user gave: a path or
    /// a URL) in errors. Unless `boot` is ``BootCheck/none``, the disk must also be bootable so,
    /// and the result says by which firmware.
    public func inspect(
        _ path: String, name: String? = nil, boot: BootCheck
    ) async throws(VirtError) -> InspectedImage {
        let name = name ?? path
        guard path.hasPrefix("/") else {
            // qemu-img reads `PROTOCOL:...` in a relative name as a protocol, not a file.
            throw VirtError(.internalError, "the image path \(path) to inspect is not absolute")
        }
        let size = try Self.fileSize(path, name: name)
        if size == 0 { throw VirtError(.badImage, "the image \(name) is empty (0 bytes): it is not a disk image") }
        // Before qemu-img opens it: a qemu-img older than 9.1 without the fix of CVE-2024-4467
        // opens a qcow2's data file (a json: one too) even for `info`.
        try Self.checkQcow2Header(path, name: name)
        let info = try await info(path, name: name)
        let format = try Self.check(info, name: name)
        var image = InspectedImage(path: path, format: format, virtualSize: info.virtualSize, partitions: nil)
        guard boot != .none else { return image }
        var head = try await readHead(path, format: format, bytes: min(Int64(Self.headBytes), info.virtualSize))
        var reading = PartitionTable.read(head)
        if case .needs(let bytes) = reading, Int64(bytes) <= info.virtualSize {
            head = try await readHead(path, format: format, bytes: Int64(bytes))
            reading = PartitionTable.read(head)
        }
        let table: PartitionTable
        switch reading {
        case .table(let found): table = found
        case .needs:
            // A GPT header whose entries lie past the end of the disk: firmware ignores it.
            table = .none
        }
        image.partitions = table
        image.firmware = try Self.checkBootable(table, head: head, format: format, size: size, name: name, boot: boot)
        return image
    }

    /// What `qemu-img info` says about the image itself.
    ///
    /// Never with `--backing-chain`: that opens each backing file in turn, and a `json:` backing
    /// specification is opened as written, network block devices included (checked: a json: nbd
    /// backing made qemu-img 10.0 connect to the socket it names). Refusing any backing file at
    /// the top makes the chain one image long anyway. Without it qemu-img opens the image with
    /// no backing file and no I/O: it reads the header only, and QEMU 9.1 and later never open
    /// a qcow2's data file then.
    func info(_ path: String, name: String) async throws(VirtError) -> QemuImageInfo {
        let command = ImageCommands.info(path)
        let result = try await run(command, output: .capture)
        guard case .exited(let code) = result.status, code == 0 else {
            // qemu-img saying it cannot read the file is a verdict on the image; qemu-img
            // killed is not (the image is kept, and the next start tries again).
            guard case .exited = result.status else {
                throw VirtError(
                    .commandFailed, "`\(command)` ended with \(result.status): \(result.errorText.lastLine)")
            }
            throw VirtError(
                .badImage, "the image \(name) is not a disk image qemu-img can read: \(result.errorText.lastLine)")
        }
        do {
            return try JSONDecoder().decode(QemuImageInfo.self, from: Data(result.standardOutput))
        } catch {
            throw VirtError(.commandFailed, "`\(command)` printed what is not its JSON image information: \(error)")
        }
    }

    /// Refuses what reads other files, or what is not raw or qcow2; returns the format.
    static func check(_ info: QemuImageInfo, name: String) throws(VirtError) -> DiskFormat {
        guard let format = DiskFormat(rawValue: info.format) else {
            throw VirtError(
                .badImage,
                "the image \(name) is in the \(info.format) format: only raw and qcow2 images are used (convert it with "
                    + "`qemu-img convert -O qcow2`)")
        }
        let flatten = "to boot what it reads, flatten it into one file first with `qemu-img convert -O qcow2 IMAGE NEW`"
        if let backing = info.backingFilename ?? info.fullBackingFilename {
            let what = backing.hasPrefix("json:") ? "a backing file given as a json: specification" : "a backing file"
            throw VirtError(
                .badImage,
                "the image \(name) has \(what) (\(backing)): refused, because the guest would read what it names on "
                    + "this host; \(flatten)")
        }
        if let dataFile = info.formatSpecific?.data?.dataFile {
            throw VirtError(
                .badImage,
                "the image \(name) has an external data file (\(dataFile)): refused, because the guest would read that "
                    + "file of this host; \(flatten)")
        }
        if info.encrypted == true || info.formatSpecific?.data?.encrypt == true {
            throw VirtError(.badImage, "the image \(name) is encrypted: there is no way to give QEMU its key here")
        }
        return format
    }

    /// The firmware that boots the disk as `boot` asks; refuses a disk that firmware would find
    /// nothing to boot on, saying why.
    static func checkBootable(
        _ table: PartitionTable, head: [UInt8], format: DiskFormat, size: Int64?, name: String, boot: BootCheck
    ) throws(VirtError) -> Firmware {
        let signature = head.count >= 512 && head[510] == 0x55 && head[511] == 0xAA
        let bootCode = PartitionTable.hasBIOSBootCode(head)
        // A disk with both boots EFI, as a machine with UEFI would. So does one whose ESP is only
        // assumed (GPT entries out of reach; a FAT file system on the whole disk, whose boot
        // sector is also BIOS boot code): unknown is not refused, and EFI is the likelier.
        let chosen: Firmware =
            switch boot {
            case .none, .auto: table.hasEFISystemPartition || !bootCode ? .efi : .bios
            case .firmware(let firmware): firmware
            }
        let nothing =
            boot == .auto
            ? "neither EFI firmware nor a BIOS finds anything"
            : chosen == .efi ? "EFI firmware finds nothing" : "a BIOS finds nothing"
        if table == .none && !bootCode {
            if format == .raw, let size, size % 512 != 0 {
                throw VirtError(
                    .badImage,
                    "the image \(name) is not a disk image: it is \(size) bytes, not a whole number of 512-byte "
                        + "sectors, and has no partition table")
            }
            if looksLikeText(head) {
                throw VirtError(
                    .badImage, "the image \(name) is not a disk image: it starts with text and has no partition table")
            }
        }
        // (With --efi-code or --efi-vars, which ask for EFI, --boot bios is a usage error.)
        let biosHint = bootCode && boot != .auto ? " (it has BIOS boot code: --boot bios, without EFI firmware)" : ""
        switch chosen {
        case .efi where table == .none:
            let first =
                signature
                ? "its first sector has a boot signature but no valid partition entries"
                : "neither a GPT header nor an MBR boot signature in its first sectors"
            throw VirtError(
                .badImage, "the image \(name) has no partition table (\(first)): \(nothing) to boot on it\(biosHint)")
        case .efi where !table.hasEFISystemPartition:
            let esp = "none of type \(PartitionTable.espGUID) (GPT) or 0xef (MBR)"
            throw VirtError(
                .badImage,
                boot == .auto
                    ? "the image \(name) has no EFI system partition (it has \(table.summary), \(esp)) and no BIOS "
                        + "boot code in its first sector: \(nothing) to boot on it"
                    : "the image \(name) has no EFI system partition: it has \(table.summary), \(esp), so EFI "
                        + "firmware finds nothing to boot on it\(biosHint)")
        case .bios where !bootCode:
            let why =
                signature
                ? "the 440 bytes of boot code in its first sector are all zero"
                : "its first sector has no boot signature (0x55 0xAA)"
            throw VirtError(
                .badImage,
                "the image \(name) has no BIOS boot code (\(why); it has \(table.summary)): a BIOS finds nothing to "
                    + "boot on it"
                    + (table.hasEFISystemPartition ? " (it has an EFI system partition: --boot efi)" : ""))
        default:
            return chosen
        }
    }

    /// The first sector is printable text (a configuration file, a log, a script), not a
    /// boot sector: all its bytes are ASCII letters, punctuation, blanks or NULs, and some are not
    /// NUL.
    static func looksLikeText(_ head: [UInt8]) -> Bool {
        let first = head.prefix(512)
        return first.contains { $0 != 0 }
            && first.allSatisfy { $0 == 0 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D || (0x20..<0x7F).contains($0) }
    }

    /// Reads the first `bytes` of the disk, as the guest would see them, through qemu-img into an
    /// anonymous file (``anonymousFile()``).
    func readHead(_ path: String, format: DiskFormat, bytes: Int64) async throws(VirtError) -> [UInt8] {
        let fd = try Self.anonymousFile()
        defer { close(fd) }
        let command = ImageCommands.readHead(path, format: format, sectors: (bytes + 511) / 512)
        let result = try await run(command, output: .fileDescriptor(fd, closeAfterStart: false))
        guard case .exited(let code) = result.status, code == 0 else {
            guard case .exited = result.status else {
                throw VirtError(
                    .commandFailed, "`\(command)` ended with \(result.status): \(result.errorText.lastLine)")
            }
            throw VirtError(.badImage, "cannot read the start of the image \(path): \(result.errorText.lastLine)")
        }
        var head = [UInt8](repeating: 0, count: Int(bytes))
        var done = 0
        while done < head.count {
            let count = head.withUnsafeMutableBytes {
                pread(fd, $0.baseAddress.map { $0 + done }, $0.count - done, off_t(done))
            }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            done += count
        }
        return Array(head[0..<done])
    }

    private typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32

    /// Glibc's Swift module does not export memfd_create (glibc 2.27 and later).
    private static let memfdCreate: MemfdCreate? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "memfd_create") else { return nil }
        return unsafeBitCast(symbol, to: MemfdCreate.self)
    }()

    /// A file without a name, private to this process, so nothing is left behind whatever
    /// happens to it: in memory (memfd_create), which needs no disk space (a full $TMPDIR must
    /// not stop a server before its banner: its `open` reports that); else in $TMPDIR
    /// (O_TMPFILE); else a named file there, unlinked the moment it exists.
    static func anonymousFile() throws(VirtError) -> Int32 {
        // MFD_CLOEXEC is 1.
        if let memfdCreate {
            let fd = "debusine-virt-image-head".withCString { memfdCreate($0, 1) }
            if fd >= 0 { return fd }
        }
        let directory = PrivateDirectory.temporaryParent
        // O_TMPFILE is __O_TMPFILE | O_DIRECTORY (open(2)); Swift does not import the macro.
        let fd = open(directory, __O_TMPFILE | O_DIRECTORY | O_RDWR | O_CLOEXEC, 0o600)
        if fd >= 0 { return fd }
        // Without O_TMPFILE (some file systems): a file of our own, unlinked at once.
        let (named, path) = try TemporaryFile.make(prefix: "\(directory)/dv-image-head.")
        CacheFiles.remove(path)
        return named
    }

    func run(_ command: Command, output: CommandOutput) async throws(VirtError) -> CommandResult {
        let runner = self.runner
        do {
            return try await withTimeout(timeout, "`\(command)`") {
                try await runner.run(command, input: .none, output: output, error: .capture)
            }
        } catch {
            if error.code == .commandFailed, await !Executables.exist("qemu-img") {
                throw VirtError(.unavailable, "qemu-img is needed to inspect images: apt-get install qemu-utils")
            }
            throw error
        }
    }

    /// The byte size of a regular file, nil for a block device; anything else is refused: a FIFO
    /// or a terminal would block qemu-img, a directory is no image.
    /// Refuses a qcow2 whose own header names a backing file or an external data file, read
    /// straight from the file (qcow2 spec: big-endian; backing file offset at byte 8 and its
    /// length at 16; version at 4; from version 3, incompatible features at 72, of which bit 2 is
    /// "external data file", the header's length at 100 and the header extensions after it, the
    /// data file's name in the one of type 0x44415441). Anything else is left to qemu-img.
    static func checkQcow2Header(_ path: String, name: String) throws(VirtError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw VirtError(.notFound, "the image \(name) cannot be read", errno: errno)
        }
        defer { close(fd) }
        // The header and its extensions lie in the first cluster, which is at least 512 bytes.
        var header = [UInt8](repeating: 0, count: 65536)
        let count = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard count >= 32, header.starts(with: [0x51, 0x46, 0x49, 0xFB]) else { return }
        func number(_ offset: Int, _ width: Int) -> UInt64 {
            header[offset..<(offset + width)].reduce(0) { $0 << 8 | UInt64($1) }
        }
        let flatten = "to boot what it reads, flatten it into one file first with `qemu-img convert -O qcow2 IMAGE NEW`"
        let backingOffset = number(8, 8)
        if backingOffset != 0 {
            let length = min(Int(number(16, 4)), 1023)
            var backing = [UInt8](repeating: 0, count: length)
            let read = backing.withUnsafeMutableBytes {
                pread(fd, $0.baseAddress, $0.count, off_t(truncatingIfNeeded: backingOffset))
            }
            let named = String(decoding: backing.prefix(max(read, 0)), as: UTF8.self)
            let what = named.hasPrefix("json:") ? "a backing file given as a json: specification" : "a backing file"
            throw VirtError(
                .badImage,
                "the image \(name) has \(what) (\(named)): refused, because the guest would read what it names on "
                    + "this host; \(flatten)")
        }
        if number(4, 4) >= 3, count >= 104, number(72, 8) & (1 << 2) != 0 {
            // The data file's name, from the header extensions (type, length, data padded to 8).
            var named = ""
            var offset = Int(number(100, 4))
            while offset >= 104, offset + 8 <= count {
                let type = number(offset, 4)
                let length = Int(number(offset + 4, 4))
                guard type != 0, offset + 8 + length <= count else { break }
                if type == 0x4441_5441 {
                    named = String(decoding: header[(offset + 8)..<(offset + 8 + length)], as: UTF8.self)
                    break
                }
                offset += 8 + (length + 7) / 8 * 8
            }
            throw VirtError(
                .badImage,
                "the image \(name) has an external data file (\(named)): refused, because the guest would read that "
                    + "file of this host; \(flatten)")
        }
    }

    static func fileSize(_ path: String, name: String) throws(VirtError) -> Int64? {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw VirtError(.notFound, "the image \(name) cannot be read", errno: errno)
        }
        switch info.st_mode & S_IFMT {
        case S_IFREG: return Int64(info.st_size)
        case S_IFBLK: return nil
        case S_IFDIR: throw VirtError(.badImage, "the image \(name) is a directory, not a disk image")
        default: throw VirtError(.badImage, "the image \(name) is not a regular file or a block device")
        }
    }
}

/// The qemu-img commands of the inspection, as argv values.
public enum ImageCommands {
    /// The image's own header, as JSON: `-U` (force-share) so an image a running VM holds can
    /// still be inspected; read-only either way. No `--backing-chain`: see
    /// ``ImageInspection/info(_:name:)``.
    public static func info(_ path: String) -> Command {
        Command("qemu-img", ["info", "--output=json", "-U", "--", path])
    }

    /// The first `sectors` 512-byte sectors of the disk as raw bytes, on stdout: `of=/dev/stdout`
    /// is reopened by qemu-img, which works when stdout is a file (the caller's memory file), not
    /// a pipe. The format is the one inspected, never probed.
    public static func readHead(_ path: String, format: DiskFormat, sectors: Int64) -> Command {
        Command(
            "qemu-img",
            [
                "dd", "-U", "-f", format.rawValue, "-O", "raw", "bs=512", "count=\(sectors)", "if=\(path)",
                "of=/dev/stdout",
            ])
    }
}

/// The part of `qemu-img info --output=json` the inspection reads.
struct QemuImageInfo: Decodable {
    var format: String
    var virtualSize: Int64
    var backingFilename: String?
    var fullBackingFilename: String?
    var encrypted: Bool?
    var formatSpecific: FormatSpecific?

    struct FormatSpecific: Decodable {
        var type: String
        var data: Details?
    }

    /// qcow2's details: its external data file, whether it is encrypted. Other formats keep
    /// other things under the same object, so a key of another shape is no decoding error.
    struct Details: Decodable {
        var dataFile: String?
        var encrypt: Bool

        enum CodingKeys: String, CodingKey {
            case dataFile = "data-file"
            case encrypt
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            dataFile = try? container.decodeIfPresent(String.self, forKey: .dataFile)
            encrypt = container.contains(.encrypt)
        }
    }

    enum CodingKeys: String, CodingKey {
        case format
        case virtualSize = "virtual-size"
        case backingFilename = "backing-filename"
        case fullBackingFilename = "full-backing-filename"
        case encrypted
        case formatSpecific = "format-specific"
    }
}

extension String {
    /// The last non-empty line: qemu-img's error, without what comes before it.
    fileprivate var lastLine: String {
        split(separator: "\n").last.map(String.init) ?? self
    }
}
