/// How the first bytes of a disk say it is partitioned, as EFI firmware reads them: a GUID
/// partition table (GPT), a legacy MBR, or a FAT file system on the whole disk.
///
/// Pure parsing of bytes ``ImageInspection`` read through qemu-img, so that it is tested without
/// any image. Lenient where firmware is lenient or could fall back (no CRC checks, no backup
/// GPT): what this accepts and the firmware still cannot boot is caught on the serial console.
public enum PartitionTable: Sendable, Equatable {
    /// A GPT: the type GUIDs of its used entries (uppercase, in the usual text form), or nil when
    /// its entries lie further into the disk than we read (then the ESP is not checked).
    case gpt(types: [String]?)
    /// An MBR with a boot signature: the type bytes of its used primary entries.
    case mbr(types: [UInt8])
    /// No partition table, but a FAT boot sector at the very start: a "superfloppy" that EFI
    /// firmware can read as one file system.
    case wholeDiskFAT
    /// Nothing recognisable.
    case none

    /// The EFI system partition's GPT type.
    public static let espGUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    /// The EFI system partition's MBR type.
    public static let espMBRType: UInt8 = 0xEF
    /// An MBR entry protecting a GPT.
    static let protectiveMBRType: UInt8 = 0xEE

    /// The sector sizes a GPT header is looked for with: 512, and 4096 for 4Kn disks.
    static let sectorSizes = [512, 4096]
    /// The most bytes the inspection reads to reach a GPT's entries (a header may put them
    /// anywhere; the usual place is right after the header).
    public static let maximumRead = 32 << 20

    /// Whether a BIOS finds boot code in the disk's first sector: a boot signature, and boot
    /// code that is not all zeros (a GPT's protective MBR as partitioning tools write it has
    /// none; GRUB's `boot.img`, a FAT boot sector's jump, or any MBR loader puts some there).
    public static func hasBIOSBootCode(_ head: [UInt8]) -> Bool {
        guard head.count >= 512, head[510] == 0x55, head[511] == 0xAA else { return false }
        return head[0..<440].contains { $0 != 0 }
    }

    /// Whether firmware finds an EFI system partition here (a whole-disk FAT counts as one;
    /// GPT entries out of reach count too, as unknown is not refused).
    public var hasEFISystemPartition: Bool {
        switch self {
        case .gpt(let types): return types.map { $0.contains(Self.espGUID) } ?? true
        case .mbr(let types): return types.contains(Self.espMBRType)
        case .wholeDiskFAT: return true
        case .none: return false
        }
    }

    /// The result of reading `head`, the first bytes of a disk: the table, or how many bytes
    /// from the start are needed to see the GPT's entries.
    public enum Reading: Sendable, Equatable {
        case table(PartitionTable)
        case needs(bytes: Int)
    }

    /// Reads the partition table from `head`, the first bytes of the disk.
    public static func read(_ head: [UInt8]) -> Reading {
        for sectorSize in sectorSizes {
            guard let header = GPTHeader(head, sectorSize: sectorSize) else { continue }
            guard header.entriesEnd <= head.count else {
                return header.entriesEnd <= maximumRead ? .needs(bytes: header.entriesEnd) : .table(.gpt(types: nil))
            }
            return .table(.gpt(types: header.types(in: head)))
        }
        if isFATBootSector(head) { return .table(.wholeDiskFAT) }
        if let types = mbrTypes(head) { return .table(.mbr(types: types)) }
        return .table(.none)
    }

    /// A GPT header at LBA 1: its signature, its own LBA and a sane entry array.
    struct GPTHeader {
        let entriesStart: Int
        let count: Int
        let entrySize: Int
        var entriesEnd: Int { entriesStart + count * entrySize }

        init?(_ head: [UInt8], sectorSize: Int) {
            guard head.count >= sectorSize + 92,
                Array(head[sectorSize..<sectorSize + 8]) == Array("EFI PART".utf8),
                PartitionTable.little(head, at: sectorSize + 24, size: 8) == 1
            else { return nil }
            let lba = PartitionTable.little(head, at: sectorSize + 72, size: 8)
            let count = PartitionTable.little(head, at: sectorSize + 80, size: 4)
            let size = PartitionTable.little(head, at: sectorSize + 84, size: 4)
            // The specification's bounds (entries of 128 * 2^n bytes, after the header); the
            // count bound keeps the arithmetic far from overflow.
            guard lba >= 2, lba < UInt64(Int.max / 2) / UInt64(sectorSize), count <= 65536, size >= 128,
                size <= 4096, size % 128 == 0
            else { return nil }
            entriesStart = Int(lba) * sectorSize
            self.count = Int(count)
            entrySize = Int(size)
        }

        /// The type GUIDs of the used entries (an all-zero type is an unused entry).
        func types(in head: [UInt8]) -> [String] {
            (0..<count).compactMap { index in
                let start = entriesStart + index * entrySize
                let guid = Array(head[start..<start + 16])
                return guid.allSatisfy { $0 == 0 } ? nil : PartitionTable.guidText(guid)
            }
        }
    }

    /// A GUID as stored on disk (the first three fields little-endian) in its text form.
    static func guidText(_ bytes: [UInt8]) -> String {
        func hex(_ slice: [UInt8]) -> String {
            slice.map { byte in
                let text = String(byte, radix: 16, uppercase: true)
                return byte < 16 ? "0" + text : text
            }.joined()
        }
        return [
            hex(bytes[0..<4].reversed()), hex(bytes[4..<6].reversed()), hex(bytes[6..<8].reversed()),
            hex(Array(bytes[8..<10])), hex(Array(bytes[10..<16])),
        ].joined(separator: "-")
    }

    /// The MBR's used primary entry types, or nil when sector 0 has no boot signature or its
    /// entries are not partition entries (a boot flag other than 0x00 or 0x80: boot code).
    static func mbrTypes(_ head: [UInt8]) -> [UInt8]? {
        guard head.count >= 512, head[510] == 0x55, head[511] == 0xAA else { return nil }
        var types: [UInt8] = []
        for index in 0..<4 {
            let entry = 446 + 16 * index
            guard head[entry] == 0x00 || head[entry] == 0x80 else { return nil }
            if head[entry + 4] != 0 { types.append(head[entry + 4]) }
        }
        return types
    }

    /// A FAT boot sector at the start of the disk: a jump instruction, a sane bytes-per-sector,
    /// the boot signature, and the file system type label where FAT12/16 or FAT32 keep it.
    static func isFATBootSector(_ head: [UInt8]) -> Bool {
        guard head.count >= 512, head[0] == 0xEB || head[0] == 0xE9, head[510] == 0x55, head[511] == 0xAA else {
            return false
        }
        let bytesPerSector = little(head, at: 11, size: 2)
        guard [512, 1024, 2048, 4096].contains(bytesPerSector) else { return false }
        return Array(head[54..<57]) == Array("FAT".utf8) || Array(head[82..<87]) == Array("FAT32".utf8)
    }

    static func little(_ bytes: [UInt8], at offset: Int, size: Int) -> UInt64 {
        (0..<size).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }

    /// Names of the partition types a message may mention.
    static let knownTypes: [String: String] = [
        espGUID: "EFI System",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
        "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    ]

    /// What the table holds, for messages: `a GPT with 1 partition (0FC6...: Linux filesystem)`.
    public var summary: String {
        switch self {
        case .gpt(let types?):
            let listed = types.map { type in Self.knownTypes[type].map { "\(type): \($0)" } ?? type }
            return "a GPT with \(count(types.count, "partition"))"
                + (types.isEmpty ? "" : " (\(listed.joined(separator: ", ")))")
        case .gpt(nil): return "a GPT"
        case .mbr(let types):
            let listed = types.map { "0x" + (($0 < 16 ? "0" : "") + String($0, radix: 16)) }
            return "an MBR partition table with \(count(types.count, "partition"))"
                + (types.isEmpty ? "" : " (type \(listed.joined(separator: ", ")))")
                + (types.contains(Self.protectiveMBRType) ? " protecting a GPT that is not there" : "")
        case .wholeDiskFAT: return "a FAT file system on the whole disk"
        case .none: return "no partition table"
        }
    }

    func count(_ number: Int, _ noun: String) -> String {
        number == 1 ? "1 \(noun)" : "\(number) \(noun)s"
    }
}
