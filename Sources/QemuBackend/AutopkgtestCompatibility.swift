import ImageCache
import VirtCore

/// `--boot`, with autopkgtest-virt-qemu's values.
public enum BootMode: String, Sendable, CaseIterable {
    case auto, bios, efi, ieee1275, none
}

/// A guest architecture this server boots, in QEMU's vocabulary, with what differs between them:
/// the QEMU program, the firmware and the CPU model.
public enum GuestArchitecture: String, Sendable, CaseIterable {
    case x86_64
    case i386
    case aarch64

    /// dpkg's name for it (what the guest's `dpkg --print-architecture` says).
    public var dpkgArchitecture: String {
        switch self {
        case .x86_64: "amd64"
        case .i386: "i386"
        case .aarch64: "arm64"
        }
    }

    /// Whether it is a PC: q35, with a BIOS (SeaBIOS) as well as EFI, SMM for secure-boot
    /// firmware, and vmgenid. Arm guests run on QEMU's `virt` machine, EFI only (AAVMF).
    public var isX86: Bool { self == .x86_64 || self == .i386 }

    /// QEMU's machine type: the PC of today for x86, `virt` (a machine made for guests, PCIe and
    /// all) for Arm, as autopkgtest-virt-qemu has them.
    public var machineType: String { isX86 ? "q35" : "virt" }

    /// qemu-system-i386 boots i386 guests, as autopkgtest-virt-qemu has it (qemu-system-x86_64
    /// would too, but with a 64-bit CPU model).
    public var qemuCommand: String { "qemu-system-\(rawValue)" }

    /// The EFI firmware and variables template Debian ships for it, and the package holding them.
    /// The only i386 build (ovmf-ia32) is a secure-boot one: see ``QemuOptions/firmwareNeedsSMM``.
    public var efiCode: String {
        switch self {
        case .x86_64: "/usr/share/OVMF/OVMF_CODE_4M.fd"
        case .i386: "/usr/share/OVMF/OVMF32_CODE_4M.secboot.fd"
        case .aarch64: "/usr/share/AAVMF/AAVMF_CODE.fd"
        }
    }

    public var efiVars: String {
        switch self {
        case .x86_64: "/usr/share/OVMF/OVMF_VARS_4M.fd"
        case .i386: "/usr/share/OVMF/OVMF32_VARS_4M.fd"
        case .aarch64: "/usr/share/AAVMF/AAVMF_VARS.fd"
        }
    }

    public var firmwarePackage: String {
        switch self {
        case .x86_64: "ovmf"
        case .i386: "ovmf-ia32"
        case .aarch64: "qemu-efi-aarch64"
        }
    }

    /// The CPU model under TCG: QEMU's defaults for x86 (autopkgtest-virt-qemu's too; with
    /// `max`, booting and guest work took 5-25 % longer here), and autopkgtest-virt-qemu's for
    /// Arm on another host (`virt` has no default).
    public var tcgCPU: String {
        switch self {
        case .x86_64: "qemu64"
        case .i386: "qemu32"
        case .aarch64: "cortex-a53"
        }
    }

    /// The package with its qemu-system program.
    public var qemuPackage: String { isX86 ? "qemu-system-x86" : "qemu-system-arm" }

    /// Whether KVM on a host of `host` (QEMU's vocabulary) can run this guest: an x86_64 host
    /// runs both, an i386 host i386 only.
    public func runsUnderKVM(onHost host: String) -> Bool {
        host == rawValue || (host == "x86_64" && self == .i386)
    }
}

/// autopkgtest-virt-qemu's command line (autopkgtest 5.49), read the way it reads it, so that a
/// user switching the server's name keeps their arguments. The tables and rules here follow
/// /usr/share/autopkgtest/lib/autopkgtest_qemu.py and /usr/bin/autopkgtest-virt-qemu.
public enum AutopkgtestQemu {
    /// `--qemu-options STRING` as Python's `str.split()` splits it: on runs of Unicode
    /// whitespace, with no quoting and no empty words.
    public static func splitLikePython(_ text: String) -> [String] {
        var words: [String] = []
        var current = String.UnicodeScalarView()
        for scalar in text.unicodeScalars {
            if isPythonWhitespace(scalar) {
                if !current.isEmpty { words.append(String(current)) }
                current = String.UnicodeScalarView()
            } else {
                current.append(scalar)
            }
        }
        if !current.isEmpty { words.append(String(current)) }
        return words
    }

    /// Python's `str.isspace()`: the characters of bidirectional class WS, B or S, or of
    /// category Zs. Spelled out, because Swift's `isWhitespace` differs (it has no U+001C-1F).
    static func isPythonWhitespace(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x09...0x0D, 0x1C...0x1F, 0x20, 0x85, 0xA0, 0x1680, 0x2000...0x200A, 0x2028, 0x2029, 0x202F, 0x205F,
            0x3000:
            return true
        default:
            return false
        }
    }

    /// `QemuFactory.qemu_arch_for_dpkg_arch`: a dpkg architecture in QEMU's vocabulary; names it
    /// does not know are taken as they are.
    public static func qemuArchitecture(forDpkg dpkg: String) -> String {
        let table = [
            "amd64": "x86_64", "arm64": "aarch64", "arm64ilp32": "aarch64", "armel": "arm", "armhf": "arm",
            "avr32": "avr", "loong64": "loongarch64", "powerpc": "ppc", "powerpcel": "ppc64le", "ppc64el": "ppc64le",
            "s390": "s390x", "x32": "x86_64",
        ]
        return table[dpkg] ?? dpkg
    }

    /// `QemuFactory.qemu_arch_for_uname`: `uname -m` in QEMU's vocabulary.
    public static func qemuArchitecture(forUname machine: String) -> String {
        let isI386 =
            machine.count == 4 && machine.hasPrefix("i") && machine.hasSuffix("86")
            && "3456".contains(machine[machine.index(after: machine.startIndex)])
        if isI386 { return "i386" }
        if machine.hasPrefix("arm") { return "arm" }
        return machine
    }

    /// The host's architecture in QEMU's vocabulary.
    public static var hostArchitecture: String {
        let machine = Host.machine
        return machine.isEmpty ? GuestArchitecture.x86_64.rawValue : qemuArchitecture(forUname: machine)
    }

    /// The VM's architecture as autopkgtest-virt-qemu chooses it (`--qemu-architecture`, else
    /// `--dpkg-architecture` translated, else the host's), refused before the banner when this
    /// server cannot boot it yet.
    public static func architecture(
        qemu: String?, dpkg: String?, host: String = hostArchitecture
    ) throws(VirtError) -> GuestArchitecture {
        let chosen: String
        let given: String
        if let qemu, !qemu.isEmpty {
            chosen = qemu
            given = "--qemu-architecture \(qemu)"
        } else if let dpkg, !dpkg.isEmpty {
            chosen = qemuArchitecture(forDpkg: dpkg)
            given = "--dpkg-architecture \(dpkg)" + (chosen == dpkg ? "" : " (QEMU architecture \(chosen))")
        } else {
            chosen = host
            given = "the host's architecture \(host)"
        }
        guard let architecture = GuestArchitecture(rawValue: chosen) else {
            let supported = GuestArchitecture.allCases.map {
                $0.rawValue == $0.dpkgArchitecture ? $0.rawValue : "\($0.rawValue) (\($0.dpkgArchitecture))"
            }
            throw VirtError(
                .unavailable,
                "\(given) is not supported yet: debusine-virt-qemu boots "
                    + "\(supported.dropLast().joined(separator: ", ")) and \(supported.last ?? "") guests only, so far")
        }
        return architecture
    }

    /// `--boot` and `--efi` write the same setting in autopkgtest-virt-qemu, so the last of them on
    /// the command line wins. `boot` is the last `--boot` value the parser kept; `arguments` is
    /// the raw command line, read only to order it against `--efi`.
    public static func bootMode(boot: BootMode?, efi: Bool, arguments: [String]) -> BootMode {
        guard efi else { return boot ?? .auto }
        guard let boot else { return .efi }
        var last: BootMode = .auto
        var index = arguments.startIndex
        while index < arguments.endIndex {
            let word = arguments[index]
            if word == "--" { break }
            if word == "--efi" {
                last = .efi
            } else if word == "--boot" {
                index += 1
                if index < arguments.endIndex { last = BootMode(rawValue: arguments[index]) ?? boot }
            } else if word.hasPrefix("--boot=") {
                last = BootMode(rawValue: String(word.dropFirst("--boot=".count))) ?? boot
            }
            index += 1
        }
        return last
    }

    /// What the image must boot with for `mode`, refusing before the banner the boot methods this
    /// server cannot serve yet. `efiFirmwareGiven`: `--efi-code` or `--efi-vars` was given, which
    /// asks for EFI where the image would decide (and makes no sense with `--boot bios`). A BIOS
    /// is a PC's: other guests boot EFI.
    public static func bootCheck(
        _ mode: BootMode, efiFirmwareGiven: Bool, architecture: GuestArchitecture = .x86_64
    ) throws(VirtError) -> BootCheck {
        switch mode {
        case .efi:
            return .firmware(.efi)
        case .auto:
            return efiFirmwareGiven || !architecture.isX86 ? .firmware(.efi) : .auto
        case .bios:
            guard architecture.isX86 else {
                throw VirtError(
                    .unavailable,
                    "--boot bios boots x86 guests (amd64, i386): \(architecture.dpkgArchitecture) guests boot EFI "
                        + "(--boot efi or auto)")
            }
            guard !efiFirmwareGiven else {
                throw VirtError(.usage, "--efi-code and --efi-vars are EFI firmware: they do not go with --boot bios")
            }
            return .firmware(.bios)
        case .ieee1275, .none:
            throw VirtError(
                .unavailable,
                "--boot \(mode.rawValue) is not supported yet: debusine-virt-qemu boots EFI and BIOS images "
                    + "(--boot efi, --efi, --boot bios or --boot auto)")
        }
    }

    /// `--timeout-reboot` is autopkgtest-virt-qemu's wait for a boot (at open and revert) and for
    /// a reboot. Here it sets both, except that an explicit `--boot-timeout` wins for boots; with
    /// neither, boots and reboots get 300 s (a TCG boot, or installing the guest agent, can take
    /// minutes).
    public static func timeouts(
        bootTimeout: Int?, timeoutReboot: Int?
    ) throws(VirtError) -> (boot: Duration, reboot: Duration) {
        if let bootTimeout, bootTimeout <= 0 {
            throw VirtError(.usage, "--boot-timeout must be positive, not \(bootTimeout)")
        }
        if let timeoutReboot, timeoutReboot <= 0 {
            throw VirtError(.usage, "--timeout-reboot must be positive, not \(timeoutReboot)")
        }
        let boot = bootTimeout ?? timeoutReboot ?? 300
        return (.seconds(boot), .seconds(timeoutReboot ?? 300))
    }
}
