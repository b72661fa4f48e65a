import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache

@Suite("Image inspection: commands and partition tables")
struct ImageInspectionUnitTests {
    @Test("qemu-img info reads the image's own header as JSON, force-shared, never its backing chain")
    func infoArgv() {
        #expect(
            ImageCommands.info("/images/a b.qcow2").argv == [
                "qemu-img", "info", "--output=json", "-U", "--", "/images/a b.qcow2",
            ])
    }

    @Test("the first sectors are read with the inspected format onto stdout, never probed")
    func readHeadArgv() {
        #expect(
            ImageCommands.readHead("/images/a.qcow2", format: .qcow2, sectors: 2048).argv == [
                "qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", "bs=512", "count=2048", "if=/images/a.qcow2",
                "of=/dev/stdout",
            ])
    }

    /// A first sector with an MBR signature and these primary partition types.
    func mbr(_ types: [UInt8], bootFlag: UInt8 = 0) -> [UInt8] {
        var sector = [UInt8](repeating: 0, count: 512)
        for (index, type) in types.enumerated() {
            sector[446 + 16 * index] = bootFlag
            sector[446 + 16 * index + 4] = type
        }
        sector[510] = 0x55
        sector[511] = 0xAA
        return sector
    }

    @Test("an MBR's primary types are read; 0xef is an EFI system partition; boot code is no table")
    func mbrTables() {
        #expect(PartitionTable.read(mbr([0x83, 0xEF])) == .table(.mbr(types: [0x83, 0xEF])))
        #expect(PartitionTable.mbr(types: [0x83, 0xEF]).hasEFISystemPartition)
        #expect(!PartitionTable.mbr(types: [0x83]).hasEFISystemPartition)
        #expect(PartitionTable.read(mbr([0x83], bootFlag: 0x42)) == .table(.none), "a boot flag of 0x42 is code")
        #expect(PartitionTable.read([UInt8](repeating: 0, count: 4096)) == .table(.none))
        #expect(PartitionTable.read(Array("myhost\n".utf8)) == .table(.none))
        #expect(PartitionTable.mbr(types: [0xEE]).summary.contains("protecting a GPT that is not there"))
    }

    @Test("a FAT boot sector at the start is a whole-disk file system, which counts as an ESP")
    func wholeDiskFAT() {
        var sector = mbr([])
        sector[0] = 0xEB
        sector[11] = 0x00
        sector[12] = 0x02
        sector.replaceSubrange(82..<87, with: Array("FAT32".utf8))
        #expect(PartitionTable.read(sector) == .table(.wholeDiskFAT))
        #expect(PartitionTable.wholeDiskFAT.hasEFISystemPartition)
    }

    @Test("GUIDs are read with their first three fields little-endian")
    func guidText() {
        let esp: [UInt8] = [
            0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B,
        ]
        #expect(PartitionTable.guidText(esp) == PartitionTable.espGUID)
    }

    @Test("a GPT header whose entries lie beyond what was read asks for more bytes, within a bound")
    func gptNeedsMore() {
        var head = [UInt8](repeating: 0, count: 1024)
        head.replaceSubrange(512..<520, with: Array("EFI PART".utf8))
        head[512 + 24] = 1  // its own LBA
        head[512 + 72] = 2  // entries at LBA 2
        head[512 + 80] = 128  // 128 entries
        head[512 + 84] = 128  // of 128 bytes
        #expect(PartitionTable.read(head) == .needs(bytes: 1024 + 16384))
        head[512 + 72 + 3] = 0x10  // entries at LBA 0x10000002: 128 GiB in
        #expect(PartitionTable.read(head) == .table(.gpt(types: nil)), "too far to read: not checked, not refused")
    }

    @Test("BIOS boot code is a boot signature with something other than zeros before the partition table")
    func biosBootCode() {
        var sector = mbr([0xEE])
        #expect(!PartitionTable.hasBIOSBootCode(sector), "a protective MBR as sfdisk writes it")
        sector[0] = 0xEB
        #expect(PartitionTable.hasBIOSBootCode(sector))
        sector[511] = 0
        #expect(!PartitionTable.hasBIOSBootCode(sector), "no boot signature")
        #expect(!PartitionTable.hasBIOSBootCode(Array(sector.prefix(511))))
    }

    @Test(
        "the firmware: EFI for a disk with an ESP (with boot code too), BIOS for boot code alone, each refused without its part, naming the other where the disk has it",
        arguments: [
            // (table, boot code, check, the firmware chosen or a part of the refusal)
            (PartitionTable.gpt(types: [PartitionTable.espGUID]), true, BootCheck.auto, "efi"),
            (.gpt(types: [PartitionTable.espGUID]), false, .auto, "efi"),
            (.mbr(types: [0x83]), true, .auto, "bios"),
            (.none, true, .auto, "bios"),
            (.gpt(types: [PartitionTable.espGUID]), true, .firmware(.bios), "bios"),
            (.mbr(types: [0x83]), true, .firmware(.bios), "bios"),
            (.mbr(types: [0x83]), false, .auto, "neither EFI firmware nor a BIOS finds anything to boot on it"),
            (.none, false, .auto, "has no partition table (its first sector has a boot signature but no valid"),
            (.none, true, .firmware(.efi), "has no partition table (its first sector has a boot signature but no"),
            (
                .none, true, .firmware(.efi),
                "EFI firmware finds nothing to boot on it (it has BIOS boot code: --boot bios"
            ),
            (.mbr(types: [0x83]), true, .firmware(.efi), "has no EFI system partition: it has an MBR"),
            (.mbr(types: [0x83]), true, .firmware(.efi), "(it has BIOS boot code: --boot bios, without EFI firmware)"),
            (.gpt(types: [PartitionTable.espGUID]), false, .firmware(.bios), "has no BIOS boot code (the 440 bytes"),
            (
                .gpt(types: [PartitionTable.espGUID]), false, .firmware(.bios),
                "(it has an EFI system partition: --boot efi)"
            ),
            (.none, false, .firmware(.bios), "a BIOS finds nothing to boot on it"),
        ])
    func firmwareChoice(_ table: PartitionTable, _ bootCode: Bool, _ check: BootCheck, _ expected: String) {
        var head = mbr([])
        if bootCode { head[0] = 0xEB }
        do throws(VirtError) {
            let firmware = try ImageInspection.checkBootable(
                table, head: head, format: .qcow2, size: nil, name: "i.qcow2", boot: check)
            #expect(firmware.rawValue == expected)
        } catch {
            #expect(error.code == .badImage)
            #expect(error.message.contains(expected), "\(error.message)")
        }
    }

    @Test("without a boot signature a BIOS boot is refused saying so, and a disk of nothing is no disk for it either")
    func noBootSignature() {
        var head = mbr([])
        head[0] = 0xEB
        head[510] = 0
        do throws(VirtError) {
            _ = try ImageInspection.checkBootable(
                .gpt(types: [PartitionTable.espGUID]), head: head, format: .raw, size: nil, name: "i.raw",
                boot: .firmware(.bios))
            Issue.record("accepted")
        } catch {
            #expect(error.message.contains("its first sector has no boot signature (0x55 0xAA)"), "\(error.message)")
            #expect(error.message.contains("(it has an EFI system partition: --boot efi)"), "\(error.message)")
        }
        let text = Array(String(repeating: "key = value\n", count: 50).utf8)
        #expect(throws: VirtError.self) {
            try ImageInspection.checkBootable(
                .none, head: text, format: .raw, size: nil, name: "t", boot: .firmware(.bios))
        }
    }

    @Test("text is told apart from boot sectors")
    func text() {
        #expect(ImageInspection.looksLikeText(Array("myhost\n".utf8)))
        #expect(!ImageInspection.looksLikeText([UInt8](repeating: 0, count: 512)))
        #expect(!ImageInspection.looksLikeText(mbr([0xEF])))
    }
}

/// The inspection with the real qemu-img, on images made in the test.
@Suite("Image inspection with qemu-img")
struct ImageInspectionTests {
    static let enabled = access("/usr/bin/qemu-img", X_OK) == 0 || TestPaths.isCI
    let inspection = ImageInspection()

    /// The error of inspecting `path`, which must be refused as a bad image.
    func refusal(_ path: String, boot: BootCheck = .firmware(.efi)) async throws -> String {
        do {
            let image = try await inspection.inspect(path, boot: boot)
            Issue.record("\(path) was accepted: \(image)")
            return ""
        } catch {
            #expect(error.code == .badImage, "\(error)")
            return error.message
        }
    }

    @Test(
        "a text file, an empty file, a directory and a raw disk with no partition table are refused, saying which",
        .enabled(if: enabled))
    func notDisks() async throws {
        let work = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(work) }
        try Data("myhost\n".utf8).write(to: URL(fileURLWithPath: "\(work)/hostname"))
        #expect(try await refusal("\(work)/hostname").contains("is not a disk image: it is 7 bytes"))
        try Data(String(repeating: "key = value\n", count: 512).utf8).write(to: URL(fileURLWithPath: "\(work)/text"))
        #expect(try await refusal("\(work)/text").contains("is not a disk image: it starts with text"))
        try Data().write(to: URL(fileURLWithPath: "\(work)/empty"))
        #expect(try await refusal("\(work)/empty").contains("is empty (0 bytes)"))
        #expect(try await refusal(work).contains("is a directory"))
        try await TestDisks.raw("\(work)/zero.raw", size: 10 << 20, layout: nil)
        #expect(try await refusal("\(work)/zero.raw").contains("has no partition table"))
    }

    @Test(
        "GPT and MBR disks without an EFI system partition are refused, raw or qcow2; with one they pass",
        .enabled(if: enabled))
    func efiSystemPartition() async throws {
        let work = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(work) }
        try await TestDisks.raw("\(work)/gpt.raw", size: 10 << 20, layout: .gptWithoutESP)
        let gpt = try await refusal("\(work)/gpt.raw")
        #expect(gpt.contains("has no EFI system partition"), "\(gpt)")
        #expect(gpt.contains("a GPT with 1 partition (0FC63DAF-8483-4772-8E79-3D69D8477DE4: Linux filesystem)"))
        try await TestDisks.qcow2(from: "\(work)/gpt.raw", to: "\(work)/gpt.qcow2")
        #expect(try await refusal("\(work)/gpt.qcow2").contains("has no EFI system partition"))
        try await TestDisks.raw("\(work)/mbr.raw", size: 10 << 20, layout: .mbrWithoutESP)
        #expect(try await refusal("\(work)/mbr.raw").contains("an MBR partition table with 1 partition (type 0x83)"))

        try await TestDisks.raw("\(work)/esp.raw", layout: .gptWithESP, fatOnESP: true)
        let raw = try await inspection.inspect("\(work)/esp.raw", boot: .firmware(.efi))
        #expect(raw.format == .raw)
        #expect(raw.virtualSize == 40 << 20)
        #expect(raw.partitions?.hasEFISystemPartition == true)
        try await TestDisks.qcow2(from: "\(work)/esp.raw", to: "\(work)/esp.qcow2")
        #expect(try await inspection.inspect("\(work)/esp.qcow2", boot: .firmware(.efi)).format == .qcow2)
        try await TestDisks.raw("\(work)/mbr-esp.raw", size: 10 << 20, layout: .mbrWithESP)
        #expect(try await inspection.inspect("\(work)/mbr-esp.raw", boot: .firmware(.efi)).format == .raw)
        // Without the ESP requirement only the format and what it reads are checked.
        #expect(try await inspection.inspect("\(work)/gpt.qcow2", boot: .none).format == .qcow2)
    }

    @Test(
        "a qcow2 with a backing file, a json: backing spec or an external data file is refused, naming it",
        .enabled(if: enabled))
    func readsOtherFiles() async throws {
        let work = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(work) }
        try Data("HOST SECRET".utf8).write(to: URL(fileURLWithPath: "\(work)/secret"))
        try await TestDisks.qcow2("\(work)/backed.qcow2", backing: "\(work)/secret")
        let backed = try await refusal("\(work)/backed.qcow2", boot: .none)
        #expect(backed.contains("has a backing file (\(work)/secret)"), "\(backed)")

        // A json: spec naming a socket we listen on: refused, and qemu-img never connected.
        let socketPath = "\(work)/nbd.sock"
        let listener = try TestSockets.listen(at: socketPath, nonBlocking: true)
        defer { close(listener) }
        let spec = #"json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":"\#(socketPath)"}}}"#
        try await TestDisks.qcow2("\(work)/json.qcow2", backing: spec)
        let json = try await refusal("\(work)/json.qcow2", boot: .none)
        #expect(json.contains("has a backing file given as a json: specification (\(spec))"), "\(json)")
        #expect(accept(listener, nil, nil) < 0 && errno == EAGAIN, "qemu-img connected to the json: backing's socket")

        try await TestDisks.qcow2("\(work)/data.qcow2", dataFile: "\(work)/data.raw")
        let data = try await refusal("\(work)/data.qcow2", boot: .none)
        #expect(data.contains("has an external data file (\(work)/data.raw)"), "\(data)")
    }

    @Test(
        "the qcow2 header alone refuses a backing file or a data file, before qemu-img opens the image",
        .enabled(if: enabled))
    func qcow2Header() async throws {
        let work = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(work) }
        try await TestDisks.qcow2("\(work)/backed.qcow2", backing: "\(work)/secret")
        try await TestDisks.qcow2("\(work)/data.qcow2", dataFile: "\(work)/data.raw")
        try await SubprocessRunner().check(
            Command("qemu-img", ["create", "-q", "-f", "qcow2", "\(work)/plain.qcow2", "1M"]))
        try await TestDisks.raw("\(work)/plain.raw", size: 1 << 20, layout: nil)
        for (file, needle) in [
            ("backed.qcow2", "has a backing file (\(work)/secret)"),
            ("data.qcow2", "has an external data file (\(work)/data.raw)"),
        ] {
            do throws(VirtError) {
                try ImageInspection.checkQcow2Header("\(work)/\(file)", name: file)
                Issue.record("\(file) passed the header check")
            } catch {
                #expect(error.code == .badImage && error.message.contains(needle), "\(error.message)")
            }
        }
        try ImageInspection.checkQcow2Header("\(work)/plain.qcow2", name: "plain.qcow2")
        try ImageInspection.checkQcow2Header("\(work)/plain.raw", name: "plain.raw")
    }

    @Test("formats other than raw and qcow2 are refused, naming the format", .enabled(if: enabled))
    func otherFormats() async throws {
        let work = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(work) }
        try await SubprocessRunner().check(
            Command("qemu-img", ["create", "-q", "-f", "vmdk", "\(work)/a.vmdk", "10M"]))
        #expect(try await refusal("\(work)/a.vmdk").contains("is in the vmdk format: only raw and qcow2"))
    }

    @Test("a download the check refuses is not kept; a cached file it refuses is removed", .enabled(if: enabled))
    func cacheCheck() async throws {
        let work = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(work) }
        try await TestDisks.raw("\(work)/gpt.raw", size: 10 << 20, layout: .gptWithoutESP)
        let cache = ImageCache(directory: "\(work)/cache", runner: LoopbackRunner())
        let inspection = self.inspection
        let check: ImageCheck = { @Sendable path async throws(VirtError) in
            _ = try await inspection.inspect(path, boot: .firmware(.efi))
        }
        await #expect(throws: VirtError.self) {
            try await cache.fetch("file://\(work)/gpt.raw", sha256: nil, check: check)
        }
        #expect(TestPaths.contents(of: "\(work)/cache") == [], "a refused download was kept")

        // Cached without a check (as an older version did), then refused by one.
        let path = try await cache.fetch("file://\(work)/gpt.raw", sha256: nil)
        cache.release(path)
        #expect(access(path, F_OK) == 0)
        await #expect(throws: VirtError.self) {
            try await cache.fetch("file://\(work)/gpt.raw", sha256: nil, check: check)
        }
        #expect(TestPaths.contents(of: "\(work)/cache") == [], "a refused cached image was kept")
    }
}
