import ImageCache
import VirtCore

/// What the firmware (OVMF, SeaBIOS) says on the serial console when it finds nothing to boot on
/// the disk.
///
/// Seen with this server's QEMU command line and Debian's OVMF (2022.11) under TCG: a disk
/// without an EFI system partition, or with one but no loader, prints within about 5 s
///
///     BdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x3,0x0): Not Found
///     BdsDxe: loading Boot0002 "EFI Internal Shell" from Fv(...)/FvFile(...)
///     UEFI Interactive Shell v2.2 ... Shell>
///
/// and with a network card (user networking), the network boot options come between the two:
/// iPXE's banner ("iPXE ... Open Source Network Boot Firmware"), then ">>Start PXE over IPv4.",
/// ">>Start PXE over IPv6.", ">>Start HTTP Boot over IPv4." each after a long DHCP timeout.
/// Firmware without a shell ends with "BdsDxe: No bootable option or device was found."
///
/// Firmware orders its boot options with every disk before the network and the shell, so any of
/// these means the disk had nothing it could start: the boot wait ends there, in seconds,
/// instead of at the boot timeout. A failed load alone does not: another disk (an extra
/// `--qemu-option` drive) may come next.
extension ConsoleWatch {
    /// A line of firmware output that means it gave up on the disks, and what it means.
    struct FirmwareGaveUp: Equatable {
        /// The line as printed (terminal escapes removed).
        var line: String
        /// What the firmware did instead, for the message: "fell back to its UEFI shell".
        var meaning: String
        /// The boot options it failed to load before (its lines), which say why.
        var failedLoads: [String]
    }

    /// The signs, in the order they are checked on each line.
    static let firmwareSigns: [(matches: @Sendable (String) -> Bool, meaning: String)] = [
        ({ $0.contains("BdsDxe: No bootable option or device was found") }, "found no bootable option or device"),
        ({ $0.contains("BdsDxe: ") && $0.contains("\"EFI Internal Shell\"") }, "fell back to its UEFI shell"),
        ({ $0.contains("UEFI Interactive Shell") || $0.hasPrefix("Shell>") }, "fell back to its UEFI shell"),
        ({ $0.contains(">>Start PXE over IPv") }, "tried to boot from the network (PXE)"),
        ({ $0.contains(">>Start HTTP Boot over IPv") }, "tried to boot from the network (HTTP boot)"),
        ({ $0.contains("Open Source Network Boot Firmware") }, "tried to boot from the network (iPXE)"),
        // SeaBIOS, on the serial console with -nographic.
        ({ $0.hasPrefix("Boot failed: not a bootable disk") }, "found no boot code on the disk"),
        ({ $0.hasPrefix("No bootable device.") }, "found no bootable device"),
    ]

    /// The first sign in `console` (the start of the console log) that the firmware found nothing
    /// to boot on the disks, or nil.
    static func firmwareGaveUp(_ console: String) -> FirmwareGaveUp? {
        var failedLoads: [String] = []
        for raw in withoutTerminalEscapes(console).split(whereSeparator: \.isNewline) {
            let line = raw.trimmingWhitespace()
            if line.contains("BdsDxe: failed to load Boot") { failedLoads.append(line) }
            if let sign = firmwareSigns.first(where: { $0.matches(line) }) {
                return FirmwareGaveUp(line: line, meaning: sign.meaning, failedLoads: failedLoads)
            }
        }
        return nil
    }

    /// The message for a boot the firmware gave up on.
    static func firmwareMessage(_ found: FirmwareGaveUp, image: String, firmware: Firmware = .efi) -> String {
        let before = found.failedLoads.isEmpty ? "" : "\"\(found.failedLoads.joined(separator: "\", \""))\", then "
        let question =
            switch firmware {
            case .efi: "does the image have an EFI system partition with a boot loader, e.g. EFI/BOOT/BOOTX64.EFI?"
            case .bios: "does the image have a BIOS boot loader, e.g. GRUB's for i386-pc, in its first sectors?"
            }
        return "the firmware found nothing to boot on the image \(image) and \(found.meaning): it printed \(before)"
            + "\"\(found.line)\" on the serial console (\(question))"
    }

    /// A Linux boot that failed for good: what the console's last line says, and what it means.
    struct BootFailed: Equatable {
        /// The line that says why (terminal escapes removed).
        var line: String
        /// What the guest did, for the message: "its kernel panicked".
        var meaning: String
    }

    /// The sign that the guest's boot failed for good, when `tail` (the end of the console log)
    /// ends with one, kernel log lines after it aside: the closing line of a kernel panic (a
    /// kernel told to reboot on panic, or kdump, has taken over before it); the rescue shell's
    /// prompt of initramfs-tools ("(initramfs)", after its reason, e.g. "The root filesystem on
    /// /dev/vda2 requires a manual fsck") or of dracut ("dracut:/#"). Only the end counts: a
    /// shell that someone leaves, or a boot that goes on, prints on.
    static func bootFailed(_ tail: String) -> BootFailed? {
        var lines = withoutTerminalEscapes(tail).split(whereSeparator: \.isNewline)
            .map { $0.trimmingWhitespace() }.filter { !$0.isEmpty }
        // The kernel may log (late I/O errors, a clocksource) after a prompt printed last.
        while let last = lines.last, isKernelMessage(Substring(last)), !last.contains("---[ end Kernel panic") {
            lines.removeLast()
        }
        guard let last = lines.last else { return nil }
        if last.contains("---[ end Kernel panic - not syncing") {
            let panic = lines.last { $0.contains("Kernel panic - not syncing") && !$0.contains("---[ end") } ?? last
            return BootFailed(line: panic, meaning: "its kernel panicked")
        }
        if last.hasPrefix("(initramfs)") {
            return BootFailed(
                line: lines.dropLast().last ?? last,
                meaning: "its initramfs gave up and waits at its rescue shell, \"(initramfs)\"")
        }
        if last.hasPrefix("dracut:/#") {
            return BootFailed(
                line: lines.dropLast().last ?? last,
                meaning: "its initramfs (dracut) gave up and waits at its emergency shell")
        }
        return nil
    }

    /// The message for a boot that failed for good. It does not blame the image: on a busy TCG
    /// host a kernel can panic, or an initramfs give up, for want of CPU time.
    static func bootFailedMessage(_ found: BootFailed, image: String) -> String {
        var hint = ""
        if found.line.contains("IO-APIC + timer") {
            hint =
                " (on a busy host without KVM the kernel's timer check can fail: no_timer_check on its command line skips it)"
        }
        return "the guest stopped booting from the image \(image): \(found.meaning), after \"\(found.line)\" on the "
            + "serial console\(hint)"
    }

    /// `text` without terminal control sequences (`ESC [ ... letter`), which OVMF's console
    /// output is full of; other bytes stay.
    static func withoutTerminalEscapes(_ text: String) -> String {
        var result = String.UnicodeScalarView()
        var scalars = text.unicodeScalars.makeIterator()
        while let scalar = scalars.next() {
            guard scalar == "\u{1B}" else {
                result.append(scalar)
                continue
            }
            // CSI: parameters and intermediates, then one final byte in @...~.
            guard let next = scalars.next(), next == "[" else { continue }
            while let byte = scalars.next(), !(0x40...0x7E).contains(byte.value) {}
        }
        return String(result)
    }

    /// The first `count` bytes of the file at `path`, decoded leniently: firmware output comes
    /// first in a console log, however much the guest writes after it.
    static func head(of path: String, count: Int = 64 << 10) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress.map { $0 + done }, count - done) }
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { break }
            done += got
        }
        return String(decoding: bytes[0..<done], as: UTF8.self)
    }
}

extension Substring {
    fileprivate func trimmingWhitespace() -> String {
        String(drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
    }
}
