import Foundation
import ImageCache
import QemuMonitor
import Testing
import VirtCore
import VirtTestSupport

@testable import QemuBackend

/// autopkgtest-virt-qemu's options as this server reads them (the reference is autopkgtest 5.49's
/// autopkgtest_qemu.py): the tables and rules, and what they put on QEMU's command line.
@Suite("autopkgtest-virt-qemu's options: meaning and QEMU command lines")
struct AutopkgtestOptionsTests {
    let paths = InstancePaths(directory: "/tmp/dvq.abc123")

    @Test("--qemu-options is split as Python's str.split() splits it: runs of Unicode whitespace, no quoting")
    func pythonSplit() {
        #expect(AutopkgtestQemu.splitLikePython("-readconfig qemu.cfg") == ["-readconfig", "qemu.cfg"])
        #expect(
            AutopkgtestQemu.splitLikePython("  -m\t1024 \n\r -snapshot\u{0B}\u{0C}x  ") == [
                "-m", "1024", "-snapshot", "x",
            ])
        #expect(AutopkgtestQemu.splitLikePython("") == [])
        #expect(AutopkgtestQemu.splitLikePython(" \t ") == [])
        // No quoting: Python keeps the quotes as part of the words.
        #expect(AutopkgtestQemu.splitLikePython("-append 'a b'") == ["-append", "'a", "b'"])
        // Python's whitespace includes the information separators and Unicode spaces; a
        // "\r\n" pair (one Character in Swift) is two separators.
        #expect(
            AutopkgtestQemu.splitLikePython("a\u{1C}b\u{1F}c\u{85}d\u{A0}e\u{2003}f\u{3000}g\r\nh")
                == ["a", "b", "c", "d", "e", "f", "g", "h"])
        // Not whitespace for Python: zero-width space, non-breaking-ish joiners.
        #expect(AutopkgtestQemu.splitLikePython("a\u{200B}b\u{2060}c") == ["a\u{200B}b\u{2060}c"])
    }

    @Test("architectures: dpkg and uname names map as autopkgtest_qemu.py maps them")
    func architectureTables() {
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "amd64") == "x86_64")
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "x32") == "x86_64")
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "arm64") == "aarch64")
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "armhf") == "arm")
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "ppc64el") == "ppc64le")
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "loong64") == "loongarch64")
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "riscv64") == "riscv64")
        #expect(AutopkgtestQemu.qemuArchitecture(forDpkg: "i386") == "i386")
        #expect(AutopkgtestQemu.qemuArchitecture(forUname: "x86_64") == "x86_64")
        #expect(AutopkgtestQemu.qemuArchitecture(forUname: "i686") == "i386")
        #expect(AutopkgtestQemu.qemuArchitecture(forUname: "armv7l") == "arm")
        #expect(AutopkgtestQemu.qemuArchitecture(forUname: "aarch64") == "aarch64")
    }

    @Test(
        "the VM's architecture: --qemu-architecture, else --dpkg-architecture, else the host's; x86_64 and i386 boot"
    )
    func architectureChoice() throws {
        #expect(try AutopkgtestQemu.architecture(qemu: nil, dpkg: nil, host: "x86_64") == .x86_64)
        #expect(try AutopkgtestQemu.architecture(qemu: nil, dpkg: "amd64", host: "x86_64") == .x86_64)
        #expect(try AutopkgtestQemu.architecture(qemu: "x86_64", dpkg: nil, host: "x86_64") == .x86_64)
        #expect(try AutopkgtestQemu.architecture(qemu: nil, dpkg: "i386", host: "x86_64") == .i386)
        #expect(try AutopkgtestQemu.architecture(qemu: "i386", dpkg: nil, host: "x86_64") == .i386)
        #expect(try AutopkgtestQemu.architecture(qemu: nil, dpkg: nil, host: "i386") == .i386)
        // --qemu-architecture takes precedence, as in the reference.
        #expect(try AutopkgtestQemu.architecture(qemu: "x86_64", dpkg: "arm64", host: "x86_64") == .x86_64)
        func refusal(_ qemu: String?, _ dpkg: String?, host: String = "x86_64") -> VirtError? {
            do {
                _ = try AutopkgtestQemu.architecture(qemu: qemu, dpkg: dpkg, host: host)
                return nil
            } catch {
                return error
            }
        }
        #expect(try AutopkgtestQemu.architecture(qemu: nil, dpkg: "arm64", host: "x86_64") == .aarch64)
        #expect(try AutopkgtestQemu.architecture(qemu: "aarch64", dpkg: "amd64", host: "x86_64") == .aarch64)
        #expect(try AutopkgtestQemu.architecture(qemu: nil, dpkg: nil, host: "aarch64") == .aarch64)
        let arm = try #require(refusal(nil, "armhf"))
        #expect(arm.code == .unavailable)
        #expect(arm.message.contains("--dpkg-architecture armhf (QEMU architecture arm) is not supported yet"))
        #expect(
            arm.message.hasSuffix("boots x86_64 (amd64), i386 and aarch64 (arm64) guests only, so far"),
            "\(arm.message)")
        let riscv = try #require(refusal(nil, "riscv64"))
        #expect(riscv.message.hasPrefix("--dpkg-architecture riscv64 is not supported yet"))
        let qemu = try #require(refusal("ppc64le", "amd64"))
        #expect(qemu.message.hasPrefix("--qemu-architecture ppc64le is not supported yet"))
        let host = try #require(refusal(nil, nil, host: "riscv64"))
        #expect(host.message.hasPrefix("the host's architecture riscv64 is not supported yet"))
    }

    @Test("--boot and --efi: the last one on the command line wins, as they share one setting in argparse")
    func bootOrder() {
        #expect(AutopkgtestQemu.bootMode(boot: nil, efi: false, arguments: []) == .auto)
        #expect(AutopkgtestQemu.bootMode(boot: .efi, efi: false, arguments: ["--boot", "efi"]) == .efi)
        #expect(AutopkgtestQemu.bootMode(boot: nil, efi: true, arguments: ["--efi"]) == .efi)
        #expect(AutopkgtestQemu.bootMode(boot: .bios, efi: true, arguments: ["--boot", "bios", "--efi", "x"]) == .efi)
        #expect(AutopkgtestQemu.bootMode(boot: .bios, efi: true, arguments: ["--efi", "--boot", "bios", "x"]) == .bios)
        #expect(
            AutopkgtestQemu.bootMode(boot: BootMode.none, efi: true, arguments: ["--efi", "--boot=none", "x"]) == .none)
        #expect(AutopkgtestQemu.bootMode(boot: .bios, efi: true, arguments: ["--boot=bios", "--efi", "x"]) == .efi)
    }

    @Test(
        "--boot efi and bios ask the image for that firmware, auto lets it decide (EFI firmware given asks for EFI); ieee1275 and none are refused as not supported yet"
    )
    func bootSupport() throws {
        #expect(try AutopkgtestQemu.bootCheck(.efi, efiFirmwareGiven: false) == .firmware(.efi))
        #expect(try AutopkgtestQemu.bootCheck(.bios, efiFirmwareGiven: false) == .firmware(.bios))
        #expect(try AutopkgtestQemu.bootCheck(.auto, efiFirmwareGiven: false) == .auto)
        #expect(try AutopkgtestQemu.bootCheck(.auto, efiFirmwareGiven: true) == .firmware(.efi))
        let mixed = #expect(throws: VirtError.self) { try AutopkgtestQemu.bootCheck(.bios, efiFirmwareGiven: true) }
        #expect(mixed?.code == .usage)
        for mode in [BootMode.ieee1275, .none] {
            let error = #expect(throws: VirtError.self) { try AutopkgtestQemu.bootCheck(mode, efiFirmwareGiven: false) }
            #expect(error?.code == .unavailable)
            #expect(error?.message.hasPrefix("--boot \(mode.rawValue) is not supported yet") == true, "\(mode)")
        }
    }

    @Test("--timeout-reboot sets the reboot wait and, without --boot-timeout, the boot wait; defaults are 300 s")
    func timeouts() throws {
        let none = try AutopkgtestQemu.timeouts(bootTimeout: nil, timeoutReboot: nil)
        #expect(none.boot == .seconds(300) && none.reboot == .seconds(300))
        let reboot = try AutopkgtestQemu.timeouts(bootTimeout: nil, timeoutReboot: 60)
        #expect(reboot.boot == .seconds(60) && reboot.reboot == .seconds(60))
        let both = try AutopkgtestQemu.timeouts(bootTimeout: 900, timeoutReboot: 60)
        #expect(both.boot == .seconds(900) && both.reboot == .seconds(60))
        let boot = try AutopkgtestQemu.timeouts(bootTimeout: 900, timeoutReboot: nil)
        #expect(boot.boot == .seconds(900) && boot.reboot == .seconds(300))
        #expect(throws: VirtError.self) { try AutopkgtestQemu.timeouts(bootTimeout: nil, timeoutReboot: 0) }
        #expect(throws: VirtError.self) { try AutopkgtestQemu.timeouts(bootTimeout: -1, timeoutReboot: nil) }
    }

    @Test("--user names the normal user unless it is root, as autopkgtest-virt-qemu's determine_normal_user")
    func normalUser() {
        var options = QemuOptions(image: "/i.qcow2", format: .qcow2)
        #expect(options.normalUser == nil)
        options.consoleUser = "root"
        #expect(options.normalUser == nil)
        options.consoleUser = "tester"
        #expect(options.normalUser == "tester")
    }

    @Test("extra images follow the boot disk read-only in the order given; none changes nothing")
    func extraImagesArgv() {
        var options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        let plain = QemuCommands.qemu(options, paths, kvm: false).argv
        options.extraImages = [
            AttachedImage(path: "/images/data.qcow2", format: .qcow2),
            AttachedImage(path: "/odd,dir/b.img", format: .raw),
        ]
        let argv = QemuCommands.qemu(options, paths, kvm: false).argv
        let drives = argv.indices.filter { argv[$0] == "-drive" }.map { argv[$0 + 1] }
        #expect(
            Array(drives.suffix(3)) == [
                "file=/tmp/dvq.abc123/overlay.qcow2,format=qcow2,if=virtio,cache=unsafe,discard=unmap",
                "file=/images/data.qcow2,format=qcow2,if=virtio,readonly=on",
                "file=/odd,,dir/b.img,format=raw,if=virtio,readonly=on",
            ])
        #expect(argv.count == plain.count + 4)
        #expect(!plain.contains { $0.hasPrefix("file=") && $0.hasSuffix("readonly=on") })
    }

    @Test("--baseimage adds only a PCIe root port to hot-plug the disk into; its QMP commands name it read-only")
    func baseImageArgv() throws {
        var options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        let plain = QemuCommands.qemu(options, paths, kvm: false).argv
        options.baseImage = true
        let argv = QemuCommands.qemu(options, paths, kvm: false).argv
        #expect(argv.count == plain.count + 2)
        #expect(argv.contains("pcie-root-port,id=baseimage-port,chassis=1"))
        #expect(argv.firstIndex(of: "pcie-root-port,id=baseimage-port,chassis=1").map { argv[$0 - 1] } == "-device")
        func json(_ value: some Encodable) throws -> String {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            return String(decoding: try encoder.encode(value), as: UTF8.self)
        }
        // Its backing cut: a file changed since its inspection names no host file.
        #expect(
            try json(BaseImage.BlockdevAdd(image: AttachedImage(path: "/images/base.qcow2", format: .qcow2)))
                == #"{"backing":null,"driver":"qcow2","file":{"driver":"file","filename":"/images/base.qcow2","read-only":true},"node-name":"baseimage","read-only":true}"#
        )
        #expect(
            try json(BaseImage.BlockdevAdd(image: AttachedImage(path: "/images/base.img", format: .raw)))
                == #"{"driver":"raw","file":{"driver":"file","filename":"/images/base.img","read-only":true},"node-name":"baseimage","read-only":true}"#,
            "a raw image has no backing to cut")
        #expect(
            try json(BaseImage.DeviceAdd())
                == #"{"bus":"baseimage-port","drive":"baseimage","driver":"virtio-blk-pci","id":"virtio-baseimage","serial":"BASEIMAGE"}"#
        )
        // autopkgtest-virt-qemu's rules: the symlink, and the partitions' UUIDs kept out of by-uuid.
        #expect(BaseImage.udevRules.contains(#"SYMLINK+="baseimage""#))
        #expect(BaseImage.udevRules.contains(#"ENV{ID_FS_UUID}:="""#))
        #expect(BaseImage.udevRules.contains("link_priority=-1024"))
    }

    @Test("--qemu-options words and --qemu-option arguments end QEMU's command line, in that order")
    func qemuOptionsArgv() {
        var options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        options.extraArguments =
            AutopkgtestQemu.splitLikePython(" -device  virtio-balloon\t-smp 4 ") + ["-name", "a b"]
        let argv = QemuCommands.qemu(options, paths, kvm: false).argv
        #expect(Array(argv.suffix(6)) == ["-device", "virtio-balloon", "-smp", "4", "-name", "a b"])
    }

    @Test("--overlay-dir moves only the overlay; gc's record is in the instance directory")
    func overlayDirectoryPaths() {
        let moved = InstancePaths(directory: "/tmp/dvq.abc123", overlayDirectory: "/dev/shm/dvq-overlay.XYZ")
        #expect(moved.overlay == "/dev/shm/dvq-overlay.XYZ/overlay.qcow2")
        #expect(moved.overlayRecord == "/tmp/dvq.abc123/overlay-dir")
        #expect(moved.qmp == paths.qmp)
        #expect(paths.overlay == "/tmp/dvq.abc123/overlay.qcow2")
        let options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        let argv = QemuCommands.qemu(options, moved, kvm: false).argv
        #expect(
            argv.contains(
                "file=/dev/shm/dvq-overlay.XYZ/overlay.qcow2,format=qcow2,if=virtio,cache=unsafe,discard=unmap"))
        // Where the overlay lives is not part of a saved state's key (nor is the instance).
        var elsewhere = options
        elsewhere.overlayParent = "/dev/shm"
        #expect(
            SavedStateKey.description(options: options, kvm: false, qemuVersion: "v")
                == SavedStateKey.description(options: elsewhere, kvm: false, qemuVersion: "v"))
    }

    @Test("a saved state's key covers the extra images and --baseimage; without them it is the key of before")
    func stateKey() throws {
        let directory = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(directory) }
        let image = "\(directory)/base.qcow2"
        let extra = "\(directory)/extra.img"
        try Data("image".utf8).write(to: URL(fileURLWithPath: image))
        try Data("extra".utf8).write(to: URL(fileURLWithPath: extra))
        let options = QemuOptions(image: image, format: .qcow2)
        let base = SavedStateKey.description(options: options, kvm: false, qemuVersion: "v")
        #expect(!base.contains("extra image"))
        var withExtra = options
        withExtra.extraImages = [AttachedImage(path: extra, format: .raw)]
        let first = SavedStateKey.description(options: withExtra, kvm: false, qemuVersion: "v")
        #expect(first != base)
        #expect(first.contains("extra image: \(extra) dev "))
        usleep(10_000)
        try Data("extra, changed".utf8).write(to: URL(fileURLWithPath: extra))
        #expect(SavedStateKey.description(options: withExtra, kvm: false, qemuVersion: "v") != first)
        var baseImage = options
        baseImage.baseImage = true
        #expect(SavedStateKey.description(options: baseImage, kvm: false, qemuVersion: "v") != base)
    }

    @Test("gc removes an --overlay-dir directory a dead server recorded, and nothing a record points at otherwise")
    func gcOverlayDirectory() throws {
        let parent = try TestPaths.makeTemporaryDirectory("dv-gc.")
        defer { TestPaths.removeTree(parent) }
        let overlays = try TestPaths.makeTemporaryDirectory("dv-overlays.")
        defer { TestPaths.removeTree(overlays) }
        // A server that died: an owner pid that runs no debusine-virt-qemu.
        func instance(recording target: String) throws -> String {
            let directory = try PrivateDirectory.make(in: parent, prefix: "dvq.")
            let paths = InstancePaths(directory: directory)
            try Data("\(Int32.max - 7)\n".utf8).write(to: URL(fileURLWithPath: paths.ownerFile))
            try Data("\(target)\n".utf8).write(to: URL(fileURLWithPath: paths.overlayRecord))
            return directory
        }
        let overlay = try PrivateDirectory.make(in: overlays, prefix: InstancePaths.overlayDirectoryPrefix)
        try Data("qcow2".utf8).write(to: URL(fileURLWithPath: "\(overlay)/overlay.qcow2"))
        let collected = try instance(recording: overlay)
        // Records that do not name a directory servers make are not followed.
        let precious = try PrivateDirectory.make(in: overlays, prefix: "precious.")
        let other = try instance(recording: precious)
        let relative = try instance(recording: "dvq-overlay.x")
        let report = QemuGarbageCollector.collect(parent: parent)
        #expect(report.contains("removed \(collected) and its overlay directory \(overlay)"), "\(report)")
        #expect(report.contains("removed \(other)"), "\(report)")
        #expect(report.contains("removed \(relative)"), "\(report)")
        #expect(!FileManager.default.fileExists(atPath: overlay))
        #expect(FileManager.default.fileExists(atPath: precious))
        #expect(TestPaths.contents(of: parent).isEmpty)
    }
}
