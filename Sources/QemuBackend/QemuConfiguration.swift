import CommandRunner
import ImageCache
import VirtCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

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
    /// The image's format as ``ImageInspection`` found it, which becomes the overlay's `-F`;
    /// nil when the options were not made from an inspected image: each boot inspects it then.
    public var imageFormat: ImageFormat?
    public var ramMiB = 2048
    public var cpus = 2
    public var accelerator = Accelerator.auto
    public var efiCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    public var efiVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
    /// User networking by default, as autopkgtest-virt-qemu and debusine's design have it:
    /// tests install their dependencies from the archive.
    public var network = Network.user
    public var bootTimeout: Duration = .seconds(300)
    public var shutdownTimeout: Duration = .seconds(30)
    public var qemu = "qemu-system-x86_64"
    /// Extra QEMU arguments, appended as given.
    public var extraArguments: [String] = []
    /// Where booted VM states are saved and restored from (the image cache's); nil boots every
    /// time (`--no-snapshot`).
    public var stateCache: String?

    public init(image: String) {
        self.image = image
    }

    /// Options for an image that passed ``ImageInspection`` (``BootImage/prepare(_:name:sha256:cacheDirectory:requireEFISystemPartition:runner:)``).
    public init(image: InspectedImage) {
        self.image = image.path
        imageFormat = image.format
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
    public var overlay: String { "\(directory)/overlay.qcow2" }
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
    /// The server's pid, for `gc` to tell live instances from orphans.
    public var ownerFile: String { "\(directory)/owner" }

    public init(directory: String) {
        self.directory = directory
    }
}

/// The external commands of the QEMU backend, as argv values.
public enum QemuCommands {
    /// The QEMU device id of the helper's port: QMP reports its guest side opening and closing
    /// (VSERPORT_CHANGE) under it.
    public static let helperPortID = "helperport"

    public static func createOverlay(base: String, format: ImageFormat, overlay: String) -> Command {
        Command("qemu-img", ["create", "-q", "-f", "qcow2", "-F", format.rawValue, "-b", base, overlay])
    }

    /// The VM: q35 with EFI, the overlay as a virtio disk with unsafe caching (the VM is thrown
    /// away), virtio-rng, vmgenid, QMP, the guest agent and the helper port on unix sockets, the serial
    /// console on a socket with a log file, no display, no defaults.
    /// The `exec:` commands QEMU runs (with /bin/sh, in the instance directory) to save a VM
    /// state and to restore one: constant strings, reading and writing the links of
    /// ``InstancePaths/stateOut`` and ``InstancePaths/stateIn``.
    public static let stateOutName = "vmstate.out"
    public static let stateInName = "vmstate.in"
    public static let saveURI = "exec:cat > \(stateOutName)"
    public static let restoreURI = "exec:cat \(stateInName)"

    /// `incoming`: start paused, waiting for a saved state (`migrate-incoming` over QMP).
    public static func qemu(
        _ options: QemuOptions, _ paths: InstancePaths, kvm: Bool, incoming: Bool = false
    )
        -> Command
    {
        var arguments = [
            "-name", "debusine-virt,process=debusine-virt-qemu",
            "-machine", "q35,accel=\(kvm ? "kvm" : "tcg")",
            "-cpu", kvm ? "host" : "max",
            "-smp", "\(options.cpus)",
            "-m", "\(options.ramMiB)",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-pidfile", paths.pidFile,
            "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=\(escaped(options.efiCode))",
            "-drive", "if=pflash,format=raw,unit=1,file=\(escaped(paths.efiVars))",
            "-drive", "file=\(escaped(paths.overlay)),format=qcow2,if=virtio,cache=unsafe,discard=unmap",
            "-device", "virtio-rng-pci",
            // A new generation id at each start: a kernel with the vmgenid driver reseeds its
            // random generator when a restored VM sees it change.
            "-device", "vmgenid,guid=auto",
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
