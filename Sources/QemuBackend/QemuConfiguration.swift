import CommandRunner
import GuestHelper
import ImageCache
import VirtCore

/// Everything that decides how an instance's QEMU runs, as given on the command line.
public struct QemuOptions: Sendable, Equatable {
    public enum Accelerator: String, Sendable, CaseIterable {
        case auto, kvm, tcg
    }

    public enum Network: String, Sendable, CaseIterable {
        /// No network device at all.
        case none
        /// QEMU user networking (slirp): the guest reaches what the host reaches.
        case user
    }

    public var image: String
    /// The image's format as ``ImageInspection`` found it, which becomes the overlay's `-F`.
    public var imageFormat: ImageFormat
    public var ramMiB = 2048
    public var cpus = 2
    public var accelerator = Accelerator.auto
    /// The guest's architecture; ``efiCode``, ``efiVars`` and ``qemu`` must be its own.
    public var architecture = GuestArchitecture.x86_64
    /// The firmware: EFI (``efiCode`` and a copy of ``efiVars`` on flash), or QEMU's own BIOS
    /// (SeaBIOS), which needs neither.
    public var firmware = Firmware.efi
    public var efiCode = GuestArchitecture.x86_64.efiCode
    public var efiVars = GuestArchitecture.x86_64.efiVars
    /// User networking by default, as autopkgtest-virt-qemu and debusine's design have it:
    /// tests install their dependencies from the archive.
    public var network = Network.user
    public var bootTimeout: Duration = .seconds(300)
    /// How long the guest may take to come back from a reboot (`--timeout-reboot`).
    public var rebootTimeout: Duration = .seconds(300)
    public var shutdownTimeout: Duration = .seconds(30)
    public var qemu = "qemu-system-x86_64"
    /// Extra QEMU arguments, appended as given.
    public var extraArguments: [String] = []
    /// Further disks after the boot disk, attached read-only in this order (autopkgtest-virt-qemu's
    /// extra IMAGE arguments). They are used as they are: no overlay, never written.
    public var extraImages: [AttachedImage] = []
    /// A read-only copy of the base image in the guest as /dev/baseimage (`--baseimage`),
    /// hot-plugged once the guest runs, as autopkgtest-virt-qemu does.
    public var baseImage = false
    /// Where the overlay goes (`--overlay-dir`): a private directory is made in it per server. Nil
    /// keeps it in the instance directory.
    public var overlayParent: String?
    /// Copy the serial console to stderr while the guest boots (`--show-boot`).
    public var showBoot = false
    /// Bytes of the serial console's log kept on the disk (`--console-log-limit`): what the guest
    /// writes past it pushes out the oldest part.
    public var consoleLogLimit = ConsoleLog.defaultLimit
    /// Who logs in on the serial console to install qemu-guest-agent (`--user`, `--password`):
    /// root by default. Another user needs sudo.
    public var consoleUser: String?
    public var consolePassword: String?
    /// Where booted VM states are saved and restored from (the image cache's); nil boots every
    /// time (`--no-snapshot`).
    public var stateCache: String?
    /// IMAGE is the image cache's copy of a URL: the cache writes it once (a new download is a
    /// new file) and marks it used at every fetch, so its times say nothing about its content.
    public var imageIsCached = false

    /// Options for `image` read as `format`; the server makes them from an inspected image
    /// (``init(image:)-(InspectedImage)``), tests from what they know.
    public init(image: String, format: ImageFormat) {
        self.image = image
        imageFormat = format
    }

    /// Options for an image that passed ``ImageInspection`` (``BootImage/prepare(_:name:sha256:cacheDirectory:boot:runner:)``).
    public init(image: InspectedImage) {
        self.image = image.path
        imageFormat = image.format
        firmware = image.firmware ?? .efi
    }

    /// The BIOS QEMU's q35 machine loads when no flash is given (Debian's seabios package, which
    /// qemu-system-x86 depends on): part of a saved state's identity.
    public static let seaBIOS = "/usr/share/seabios/bios-256k.bin"

    /// Whether the firmware is a secure-boot build of OVMF (Debian's `*.secboot.fd`, which the
    /// `.ms` and `.snakeoil` names link to, and the only i386 build): those require SMM and a
    /// flash that only SMM code may write, and stop early without them.
    public var firmwareNeedsSMM: Bool {
        guard firmware == .efi else { return false }
        return AbsolutePath.real(efiCode).split(separator: "/").last?.contains(".secboot.") ?? false
    }

    /// `suggested-normal-user=`: the `--user` given, unless it is root (as autopkgtest-virt-qemu
    /// has it); nil means the guest's first account in 1000-59999.
    public var normalUser: String? {
        consoleUser.flatMap { $0 == "root" || $0.isEmpty ? nil : $0 }
    }
}

/// A disk image given on the command line with the format it is opened with.
public struct AttachedImage: Sendable, Equatable {
    public var path: String
    public var format: ImageFormat

    public init(path: String, format: ImageFormat) {
        self.path = path
        self.format = format
    }
}

/// Whether KVM can run guests here. /dev/kvm existing is not enough: on some hosts (PVM, nested
/// set-ups) it opens fine but the CPU lacks vmx/svm and a stock guest kernel hangs.
public enum KVMProbe {
    public static func usable(devicePath: String = "/dev/kvm", cpuinfoPath: String = "/proc/cpuinfo") -> Bool {
        let fd = open(devicePath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        close(fd)
        return cpuHasVirtualization(cpuinfo: SmallFile.text(cpuinfoPath) ?? "")
    }

    /// True when a `flags` line lists vmx (Intel) or svm (AMD).
    public static func cpuHasVirtualization(cpuinfo: String) -> Bool {
        for line in cpuinfo.split(separator: "\n") where line.hasPrefix("flags") {
            let flags = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == ":" })
            if flags.contains("vmx") || flags.contains("svm") { return true }
        }
        return false
    }
}

/// The disk image formats QEMU is given explicitly (never probed: probing raw images is unsafe),
/// as ``ImageInspection`` found them.
public typealias ImageFormat = DiskFormat

/// The files of one instance inside its private directory. Names are short: unix socket paths
/// are limited to 108 bytes.
public struct InstancePaths: Sendable, Equatable {
    public let directory: String
    /// The private directory the overlay lives in when `--overlay-dir` is given (its path is
    /// recorded in ``overlayRecord`` for `gc`); nil: the instance directory.
    public let overlayDirectory: String?
    public var overlay: String { "\(overlayDirectory ?? directory)/overlay.qcow2" }
    /// Names ``overlayDirectory`` for `gc`, which finds instance directories only in $TMPDIR.
    public var overlayRecord: String { "\(directory)/\(Self.overlayRecordName)" }
    public static let overlayRecordName = "overlay-dir"
    /// The prefix of the private directories made in an `--overlay-dir`.
    public static let overlayDirectoryPrefix = "dvq-overlay."
    public var efiVars: String { "\(directory)/efivars.fd" }
    public var qmp: String { "\(directory)/qmp.sock" }
    public var qga: String { "\(directory)/qga.sock" }
    public var helperPort: String { "\(directory)/helper.sock" }
    public var auxverb: String { "\(directory)/aux.sock" }
    public var console: String { "\(directory)/console.sock" }
    public var consoleLog: String { "\(directory)/console.log" }
    public var qemuLog: String { "\(directory)/qemu.log" }
    public var pidFile: String { "\(directory)/qemu.pid" }
    /// Symbolic links to the saved state being written and the one being restored: QEMU's
    /// `exec:` migration runs a shell command, and fixed names relative to QEMU's working
    /// directory (this one) keep every path out of it.
    public var stateOut: String { "\(directory)/\(QemuCommands.stateOutName)" }
    public var stateIn: String { "\(directory)/\(QemuCommands.stateInName)" }
    /// The guest's RAM as a file, for a boot whose state is saved (``GuestMemory/savable(file:)``).
    public var ram: String { "\(directory)/ram" }
    /// The server's pid, for `gc` to tell live instances from orphans.
    public var ownerFile: String { "\(directory)/\(OwnedDirectory.ownerFileName)" }

    public init(directory: String, overlayDirectory: String? = nil) {
        self.directory = directory
        self.overlayDirectory = overlayDirectory
    }
}

/// Where a guest's RAM is.
///
/// A VM whose state is saved keeps its RAM in a file mapped shared, so that saving copies the
/// file while the VM is stopped and the migration stream holds only the devices' state
/// (QEMU's x-ignore-shared). A restored VM maps that saved file private and read-only: pages are
/// read as the guest touches them, its writes stay its own, and any number of guests map one
/// file at once.
public enum GuestMemory: Sendable, Equatable {
    /// Anonymous memory: `--no-snapshot`, and a QEMU before 8.2 (whose saved states hold the RAM).
    case anonymous
    /// A file, mapped shared: a boot whose state is saved.
    case savable(file: String)
    /// A saved RAM file, mapped private.
    case restored(file: String)
}

/// The external commands of the QEMU backend, as argv values.
public enum QemuCommands {
    /// The QEMU device id of the helper's port: QMP reports its guest side opening and closing
    /// (VSERPORT_CHANGE) under it.
    public static let helperPortID = "helperport"
    /// The PCIe root port the `--baseimage` disk is hot-plugged into (q35's root bus takes no
    /// hot-plugged devices), and the ids of that disk's block node and device.
    public static let baseImagePortID = "baseimage-port"
    public static let baseImageNode = "baseimage"
    public static let baseImageDeviceID = "virtio-baseimage"

    public static func createOverlay(base: String, format: ImageFormat, overlay: String) -> Command {
        Command("qemu-img", ["create", "-q", "-f", "qcow2", "-F", format.rawValue, "-b", base, overlay])
    }

    /// The VM: q35 with EFI (or SeaBIOS), the overlay as a virtio disk with unsafe caching (the VM is thrown
    /// away), virtio-rng, vmgenid, QMP, the guest agent and the helper port on unix sockets, the serial
    /// console on a socket with a log file, no display, no defaults.
    /// The `exec:` commands QEMU runs (with /bin/sh, in the instance directory) to save a VM
    /// state and to restore one: constant strings, reading and writing the links of
    /// ``InstancePaths/stateOut`` and ``InstancePaths/stateIn``.
    public static let stateOutName = "vmstate.out"
    public static let stateInName = "vmstate.in"
    public static let saveURI = "exec:cat > \(stateOutName)"
    public static let restoreURI = "exec:cat \(stateInName)"

    /// The id of the memory backend that holds the guest's RAM when it is a file: the name of
    /// that RAM in a saved state, so the same in the saving and the restoring VM.
    public static let memoryBackendID = "guestram"

    /// `memory` says where the guest's RAM is; `incoming`: start paused, waiting for a saved
    /// state (`migrate-incoming` over QMP).
    public static func qemu(
        _ options: QemuOptions, _ paths: InstancePaths, kvm: Bool, memory: GuestMemory = .anonymous,
        incoming: Bool = false
    )
        -> Command
    {
        let smm = options.firmwareNeedsSMM
        var machine = "\(options.architecture.machineType),accel=\(kvm ? "kvm" : "tcg")" + (smm ? ",smm=on" : "")
        var backend: [String] = []
        let file = "memory-backend-file,id=\(memoryBackendID),size=\(options.ramMiB)M"
        switch memory {
        case .anonymous: break
        case .savable(let path):
            machine += ",memory-backend=\(memoryBackendID)"
            backend = ["-object", "\(file),mem-path=\(escaped(path)),share=on"]
        case .restored(let path):
            machine += ",memory-backend=\(memoryBackendID)"
            backend = ["-object", "\(file),mem-path=\(escaped(path)),share=off,readonly=on,rom=off"]
        }
        var arguments = [
            "-name", "debusine-virt,process=debusine-virt-qemu",
            "-machine", machine,
            // A `-cpu` in --qemu-options comes later and wins.
            "-cpu", kvm ? "host" : options.architecture.tcgCPU,
            "-smp", "\(options.cpus)",
            "-m", "\(options.ramMiB)",
        ]
        arguments += backend
        arguments += [
            "-nodefaults", "-no-user-config",
        ]
        // -nographic (with -nodefaults, nothing on QEMU's own stdio) also has SeaBIOS write to the
        // serial console (fw_cfg etc/sercon-port), where "No bootable device." is seen. OVMF
        // writes there anyway; its machines keep the command line their saved states have.
        arguments += options.firmware == .bios ? ["-nographic"] : ["-display", "none"]
        arguments += ["-pidfile", paths.pidFile]
        // With no flash, QEMU's machine boots its own BIOS (SeaBIOS).
        if options.firmware == .efi {
            arguments += [
                "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=\(escaped(options.efiCode))",
                "-drive", "if=pflash,format=raw,unit=1,file=\(escaped(paths.efiVars))",
            ]
        }
        if smm { arguments += ["-global", "driver=cfi.pflash01,property=secure,value=on"] }
        arguments += [
            "-drive", "file=\(escaped(paths.overlay)),format=qcow2,if=virtio,cache=unsafe,discard=unmap",
        ]
        // After the boot disk, in the order given: vdb, vdc, ... in the guest.
        for image in options.extraImages {
            arguments += [
                "-drive", "file=\(escaped(image.path)),format=\(image.format.rawValue),if=virtio,readonly=on",
            ]
        }
        arguments += ["-device", "virtio-rng-pci"]
        // A new generation id at each start: a kernel with the vmgenid driver reseeds its random
        // generator when a restored VM sees it change. (An x86 device: on Arm the helper's
        // reseed after a restore is all.)
        if options.architecture.isX86 { arguments += ["-device", "vmgenid,guid=auto"] }
        arguments += [
            "-chardev", "socket,id=qmp,path=\(escaped(paths.qmp)),server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-device", "virtio-serial-pci",
            "-chardev", "socket,id=qga,path=\(escaped(paths.qga)),server=on,wait=off",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            "-chardev", "socket,id=helper,path=\(escaped(paths.helperPort)),server=on,wait=off",
            "-device",
            "virtserialport,chardev=helper,id=\(QemuCommands.helperPortID),name=\(GuestHelperScript.portName)",
            "-chardev",
            "socket,id=console,path=\(escaped(paths.console)),server=on,wait=off,logfile=\(escaped(paths.consoleLog))",
            "-serial", "chardev:console",
        ]
        if options.baseImage {
            arguments += ["-device", "pcie-root-port,id=\(baseImagePortID),chassis=1"]
        }
        switch options.network {
        case .none: arguments += ["-nic", "none"]
        case .user: arguments += ["-nic", "user,model=virtio-net-pci"]
        }
        if incoming { arguments += ["-incoming", "defer"] }
        return Command(
            options.qemu, arguments + options.extraArguments, workingDirectory: paths.directory, newSession: true)
    }

    /// A value inside QEMU's `key=value,...` option syntax: commas are doubled.
    static func escaped(_ value: String) -> String {
        String(value.flatMap { $0 == "," ? [",", ","] : [$0] })
    }
}
