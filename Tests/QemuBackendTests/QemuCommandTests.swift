import CommandRunner
import Foundation
import GuestHelper
import ImageCache
import Testing
import VirtCore
import VirtTestSupport

@testable import QemuBackend

@Suite("QEMU command lines and host probes")
struct QemuCommandTests {
    let paths = InstancePaths(directory: "/tmp/dvq.abc123")

    @Test("the overlay names its base by absolute path and format")
    func overlay() {
        let command = QemuCommands.createOverlay(base: "/images/base.img", format: .raw, overlay: paths.overlay)
        #expect(
            command.argv == [
                "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/images/base.img",
                "/tmp/dvq.abc123/overlay.qcow2",
            ])
    }

    @Test(
        "the VM: EFI pflash, unsafe-cached virtio overlay, rng, sockets in the instance directory, network off when asked"
    )
    func qemuDefaults() {
        var options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        #expect(options.network == .user, "user networking is the default, as with autopkgtest-virt-qemu")
        options.network = .none
        options.cpus = 3
        options.ramMiB = 1024
        let argv = QemuCommands.qemu(options, paths, kvm: false).argv
        func value(after flag: String) -> [String] {
            argv.indices.filter { argv[$0] == flag && $0 + 1 < argv.count }.map { argv[$0 + 1] }
        }
        #expect(argv.first == "qemu-system-x86_64")
        #expect(value(after: "-machine") == ["q35,accel=tcg"])
        #expect(value(after: "-cpu") == ["qemu64"], "TCG gets autopkgtest-virt-qemu's CPU model there")
        #expect(value(after: "-smp") == ["3"])
        #expect(value(after: "-m") == ["1024"])
        #expect(value(after: "-nic") == ["none"])
        #expect(!argv.contains("-enable-kvm"))
        let drives = value(after: "-drive")
        #expect(drives.contains("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"))
        #expect(drives.contains("if=pflash,format=raw,unit=1,file=/tmp/dvq.abc123/efivars.fd"))
        #expect(drives.contains("file=/tmp/dvq.abc123/overlay.qcow2,format=qcow2,if=virtio,cache=unsafe,discard=unmap"))
        #expect(value(after: "-device").contains("virtio-rng-pci"))
        #expect(value(after: "-device").contains("virtserialport,chardev=qga,name=org.qemu.guest_agent.0"))
        #expect(
            value(after: "-device").contains("virtserialport,chardev=helper,id=helperport,name=org.debusine.virt.0"))
        #expect(value(after: "-chardev").allSatisfy { $0.contains("path=/tmp/dvq.abc123/") })
        #expect(QemuCommands.qemu(options, paths, kvm: false).newSession, "QEMU must not share our terminal's signals")
        // Every socket path fits sockaddr_un even under a long TMPDIR prefix of this size.
        #expect(
            [paths.qmp, paths.qga, paths.helperPort, paths.auxverb, paths.console].allSatisfy { $0.utf8.count < 108 })
    }

    @Test("KVM and user networking change only what they should; commas in paths are escaped for QEMU")
    func variants() {
        var options = QemuOptions(image: "/i.qcow2", format: .qcow2)
        options.network = .user
        options.efiCode = "/odd,dir/CODE.fd"
        let argv = QemuCommands.qemu(options, paths, kvm: true).argv
        #expect(argv.contains("q35,accel=kvm"))
        #expect(argv.indices.contains { argv[$0] == "-cpu" && $0 + 1 < argv.count && argv[$0 + 1] == "host" })
        #expect(argv.contains("user,model=virtio-net-pci"))
        #expect(argv.contains("if=pflash,format=raw,unit=0,readonly=on,file=/odd,,dir/CODE.fd"))
    }

    @Test(
        "an i386 guest: qemu-system-i386, the 32-bit CPU model, OVMF32 with SMM and a secure flash; x86_64 neither"
    )
    func i386Guest() throws {
        let architecture = try AutopkgtestQemu.architecture(qemu: nil, dpkg: "i386", host: "x86_64")
        var options = QemuOptions(image: "/i.qcow2", format: .qcow2)
        options.architecture = architecture
        options.qemu = architecture.qemuCommand
        options.efiCode = architecture.efiCode
        options.efiVars = architecture.efiVars
        let argv = QemuCommands.qemu(options, paths, kvm: false).argv
        func value(after flag: String) -> [String] {
            argv.indices.filter { argv[$0] == flag && $0 + 1 < argv.count }.map { argv[$0 + 1] }
        }
        #expect(argv.first == "qemu-system-i386")
        #expect(value(after: "-cpu") == ["qemu32"])
        // OVMF32's only build is a secure-boot one: without SMM it stops before the boot loader.
        #expect(value(after: "-machine") == ["q35,accel=tcg,smm=on"])
        #expect(value(after: "-global") == ["driver=cfi.pflash01,property=secure,value=on"])
        #expect(
            value(after: "-drive").contains(
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF32_CODE_4M.secboot.fd"))
        #expect(architecture.dpkgArchitecture == "i386" && architecture.firmwarePackage == "ovmf-ia32")
        // KVM on an x86_64 host runs i386 guests; an i386 host no x86_64 ones.
        #expect(GuestArchitecture.i386.runsUnderKVM(onHost: "x86_64"))
        #expect(GuestArchitecture.i386.runsUnderKVM(onHost: "i386"))
        #expect(GuestArchitecture.x86_64.runsUnderKVM(onHost: "x86_64"))
        #expect(!GuestArchitecture.x86_64.runsUnderKVM(onHost: "i386"))
        #expect(!GuestArchitecture.x86_64.runsUnderKVM(onHost: "aarch64"))

        let plain = QemuCommands.qemu(QemuOptions(image: "/i.qcow2", format: .qcow2), paths, kvm: false).argv
        #expect(!plain.contains("-global") && plain.contains("q35,accel=tcg"))
    }

    @Test("a secure-boot OVMF is known by its file name, also through the links Debian ships to it")
    func secureBootFirmware() throws {
        let directory = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(directory) }
        try Data().write(to: URL(fileURLWithPath: "\(directory)/OVMF_CODE_4M.secboot.fd"))
        try FileManager.default.createSymbolicLink(
            atPath: "\(directory)/OVMF_CODE_4M.ms.fd", withDestinationPath: "OVMF_CODE_4M.secboot.fd")
        try Data().write(to: URL(fileURLWithPath: "\(directory)/OVMF_CODE_4M.fd"))
        var options = QemuOptions(image: "/i.qcow2", format: .qcow2)
        for (name, secure) in [
            ("OVMF_CODE_4M.secboot.fd", true), ("OVMF_CODE_4M.ms.fd", true), ("OVMF_CODE_4M.fd", false),
        ] {
            options.efiCode = "\(directory)/\(name)"
            #expect(options.firmwareNeedsSMM == secure, "\(name)")
        }
    }

    @Test("KVM counts as usable only with vmx or svm among the CPU flags")
    func kvmProbe() {
        #expect(KVMProbe.cpuHasVirtualization(cpuinfo: "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse\n"))
        #expect(KVMProbe.cpuHasVirtualization(cpuinfo: "flags\t\t: fpu svm\n"))
        #expect(!KVMProbe.cpuHasVirtualization(cpuinfo: "flags\t\t: fpu vme de pse sse hypervisor\n"))
        #expect(!KVMProbe.cpuHasVirtualization(cpuinfo: "vmx flags\t: ept\n"))
        #expect(!KVMProbe.usable(devicePath: "/nonexistent/kvm"))
    }

    @Test("the helper's launcher runs its argv as given where systemd does not run (as on this host)")
    func launcherWithoutSystemd() async throws {
        try #require(access("/run/systemd/system", F_OK) != 0, "this host runs systemd")
        let result = try await SubprocessRunner().run(
            Command("/bin/sh", ["-c", GuestHelperScript.launcher, "sh", "/bin/echo", "a b", "$(c)"]))
        #expect(result.status == .exited(0))
        #expect(result.outputText == "a b $(c)")
    }

    @Test("the helper's port has the device id the port watcher looks for")
    func helperPortID() throws {
        let paths = InstancePaths(directory: "/tmp/x")
        let argv = QemuCommands.qemu(QemuOptions(image: "/i.qcow2", format: .qcow2), paths, kvm: false).argv
        #expect(argv.contains { $0.hasPrefix("virtserialport,chardev=helper,id=\(QemuCommands.helperPortID),") })
    }

    @Test("options made from an inspected image carry its format, which the boot uses for the overlay's -F")
    func inspectedFormat() {
        let image = InspectedImage(path: "/images/base.img", format: .qcow2, virtualSize: 1 << 30, partitions: nil)
        let options = QemuOptions(image: image)
        #expect(options.image == "/images/base.img")
        #expect(options.imageFormat == .qcow2)
    }
}

@Suite("Saved VM states: command lines and keys")
struct SavedStateCommandTests {
    let paths = InstancePaths(directory: "/tmp/dvq.abc123")

    @Test("QEMU runs in the instance directory with vmgenid; a restore adds only -incoming defer")
    func incoming() {
        let options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        let boot = QemuCommands.qemu(options, paths, kvm: false)
        let restore = QemuCommands.qemu(options, paths, kvm: false, incoming: true)
        #expect(boot.workingDirectory == paths.directory, "the exec: migration names are relative to it")
        #expect(boot.argv.contains("vmgenid,guid=auto"))
        #expect(!boot.argv.contains("-incoming"))
        #expect(restore.argv == boot.argv + ["-incoming", "defer"])
    }

    @Test("a saving boot maps its RAM from a file shared; a restore maps the saved file private and read-only")
    func mappedMemory() {
        let options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        let plain = QemuCommands.qemu(options, paths, kvm: false).argv
        #expect(!plain.contains("-object") && plain.contains("q35,accel=tcg"))
        let saving = QemuCommands.qemu(options, paths, kvm: false, memory: .savable(file: paths.ram)).argv
        #expect(saving.contains("q35,accel=tcg,memory-backend=guestram"))
        #expect(
            saving.firstIndex(of: "-object").map { saving[$0 + 1] }
                == "memory-backend-file,id=guestram,size=2048M,mem-path=/tmp/dvq.abc123/ram,share=on")
        let restoring = QemuCommands.qemu(
            options, paths, kvm: false, memory: .restored(file: "/cache/states/k,1/ram"), incoming: true
        ).argv
        #expect(
            restoring.firstIndex(of: "-object").map { restoring[$0 + 1] }
                == "memory-backend-file,id=guestram,size=2048M,mem-path=/cache/states/k,,1/ram,share=off,readonly=on,rom=off"
        )
        #expect(restoring.suffix(2) == ["-incoming", "defer"])
        // The rest is the saving VM's command line: what the state was saved from.
        #expect(
            restoring.filter { !$0.hasPrefix("memory-backend-file") }.dropLast(2)
                == saving.filter { !$0.hasPrefix("memory-backend-file") }[...])
    }

    @Test("QEMU 8.2 and later save the RAM as a file of its own; earlier ones in the stream, with another key")
    func memoryByVersion() {
        for (version, mapped) in [
            ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", true),
            ("QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)", true),
            ("QEMU emulator version 8.1.5", false),
            ("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)", false),
            ("something else", false),
        ] {
            #expect(
                SavedStateKey.memory(qemuVersion: version, paths) == (mapped ? .savable(file: paths.ram) : .anonymous),
                "\(version)")
        }
        let options = QemuOptions(image: "/images/base.qcow2", format: .qcow2)
        let new = SavedStateKey.description(options: options, kvm: false, qemuVersion: "QEMU emulator version 10.0.2")
        let old = SavedStateKey.description(options: options, kvm: false, qemuVersion: "QEMU emulator version 7.2.19")
        #expect(new.contains("mem-path=/INSTANCE/ram,share=on") && !old.contains("memory-backend"))
        #expect(new.hasPrefix("debusine-virt saved state format 3\n"))
    }

    @Test("the exec: migration commands are constants naming links in the instance directory, never a path")
    func migrationURIs() {
        #expect(QemuCommands.saveURI == "exec:cat > vmstate.out")
        #expect(QemuCommands.restoreURI == "exec:cat vmstate.in")
        #expect(paths.stateOut == "/tmp/dvq.abc123/vmstate.out")
        #expect(paths.stateIn == "/tmp/dvq.abc123/vmstate.in")
    }

    @Test("the key changes with QEMU's version, the VM's shape, the image, the firmware; not with the instance")
    func keyInputs() throws {
        let directory = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(directory) }
        let image = "\(directory)/base.qcow2"
        try Data("image".utf8).write(to: URL(fileURLWithPath: image))
        var options = QemuOptions(image: image, format: .qcow2)
        func key(_ options: QemuOptions, kvm: Bool = false, version: String = "QEMU emulator version 10.0.2") -> String
        {
            SavedStateKey.description(options: options, kvm: kvm, qemuVersion: version)
        }
        let base = key(options)
        #expect(base == key(options), "the same VM has the same key")
        #expect(base.contains("guest helper: \(GuestHelperScript.version)"))
        #expect(!base.contains("/tmp/dvq."), "no instance directory in the key")
        #expect(key(options, version: "QEMU emulator version 7.2.0") != base)
        #expect(key(options, kvm: true) != base)
        var changed = options
        changed.ramMiB = 1024
        #expect(key(changed) != base)
        changed = options
        changed.cpus = 1
        #expect(key(changed) != base)
        changed = options
        changed.network = .none
        #expect(key(changed) != base)
        changed = options
        changed.extraArguments = ["-device", "virtio-balloon"]
        #expect(key(changed) != base)
        changed = options
        changed.efiVars = "\(directory)/other-vars.fd"
        #expect(key(changed) != base)
        // The image rewritten in place: same path, new modification time and size.
        usleep(10_000)
        try Data("image, changed".utf8).write(to: URL(fileURLWithPath: image))
        #expect(key(options) != base)
        // Rewritten again with the same size, its modification time set back (`touch -r`, `cp -p`):
        // only the change time, which nobody sets, tells.
        let rewritten = key(options)
        var before = stat()
        #expect(stat(image, &before) == 0)
        usleep(10_000)
        try Data("image, CHANGED".utf8).write(to: URL(fileURLWithPath: image))
        var times = [before.st_atim, before.st_mtim]
        #expect(utimensat(AT_FDCWD, image, &times, 0) == 0)
        var after = stat()
        #expect(stat(image, &after) == 0)
        #expect(after.st_size == before.st_size && after.st_mtim.tv_nsec == before.st_mtim.tv_nsec)
        #expect(key(options) != rewritten)
        // The image cache's copy of a URL is marked used (its times set) at every fetch: the
        // saved state must still be found by the next server.
        var cached = options
        cached.imageIsCached = true
        let beforeUse = key(cached)
        let pathBeforeUse = key(options)
        usleep(10_000)
        #expect(utimensat(AT_FDCWD, image, nil, 0) == 0)
        #expect(key(cached) == beforeUse, "a cached image's use changed its state's key")
        #expect(key(options) != pathBeforeUse, "a path's image is known by its times too")
        options.stateCache = "/elsewhere"
        #expect(
            key(options) == key(QemuOptions(image: image, format: .qcow2)), "where states are kept is not part of them")
    }
}

@Suite("Reading the serial console")
struct ConsoleWatchTests {
    @Test("a getty login prompt at the end of the console is recognised, and nothing else is")
    func loginPrompt() {
        #expect(
            ConsoleWatch.showsLoginPrompt(
                "[  OK  ] Started getty.\r\n\r\nDebian GNU/Linux 12 vm ttyS0\r\n\r\nvm login: "))
        #expect(ConsoleWatch.showsLoginPrompt("debusine-virt login:\n"))
        #expect(!ConsoleWatch.showsLoginPrompt("[  OK  ] Reached target multi-user.target\r\n"))
        #expect(!ConsoleWatch.showsLoginPrompt("Last login: Sun Nov 22 on ttyS0\n"))
        #expect(!ConsoleWatch.showsLoginPrompt(""))
        // The kernel writes to the same console, after the prompt and on its line.
        #expect(
            ConsoleWatch.showsLoginPrompt(
                "vm login: [   42.066323] kvm: Nested Virtualization enabled\r\n[   42.066621] SVM: kvm: Nested "
                    + "Paging enabled\r\n\r\n"))
        #expect(ConsoleWatch.showsLoginPrompt("vm login:\r\n[  101.5] random: crng init done\r\n"))
        #expect(!ConsoleWatch.showsLoginPrompt("vm login: root\r\nroot@vm:~# "))
        #expect(!ConsoleWatch.showsLoginPrompt("vm login: [ OK ] Started x\r\n"))
    }

    /// A console log OVMF really wrote, under Tests/QemuBackendTests/Fixtures.
    func fixture(_ name: String) throws -> String {
        try String(
            contentsOfFile: "\(TestPaths.repositoryRoot)/Tests/QemuBackendTests/Fixtures/\(name)", encoding: .utf8)
    }

    @Test("OVMF falling back to its UEFI shell after the disk is recognised, with the failed load that says why")
    func firmwareShell() throws {
        for name in ["ovmf-no-esp.log", "ovmf-esp-without-loader.log"] {
            let found = try #require(ConsoleWatch.firmwareGaveUp(try fixture(name)), "\(name)")
            #expect(found.meaning == "fell back to its UEFI shell")
            #expect(found.line.hasPrefix("BdsDxe: loading Boot0002 \"EFI Internal Shell\""), "\(found.line)")
            #expect(
                found.failedLoads == [
                    "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x3,0x0): Not Found"
                ])
            let message = ConsoleWatch.firmwareMessage(found, image: "/i.raw")
            #expect(message.hasPrefix("the firmware found nothing to boot on the image /i.raw and fell back to its"))
            #expect(message.contains("Not Found\", then \"BdsDxe: loading Boot0002 \"EFI Internal Shell\""))
        }
    }

    @Test(
        "SeaBIOS finding no boot code on the disk, as it says on the serial console with -nographic; the message asks for a BIOS loader"
    )
    func seaBIOSGaveUp() throws {
        // Recorded from a disk of zeros, -nodefaults -nographic -serial file:..., no network.
        let found = try #require(ConsoleWatch.firmwareGaveUp(try fixture("seabios-no-boot-code.log")))
        #expect(found.line == "Boot failed: not a bootable disk")
        #expect(found.meaning == "found no boot code on the disk")
        let message = ConsoleWatch.firmwareMessage(found, image: "/i.raw", firmware: .bios)
        #expect(message.contains("does the image have a BIOS boot loader"), "\(message)")
        #expect(
            ConsoleWatch.firmwareGaveUp("\r\nNo bootable device.  Retrying in 60 seconds.\r\n")?.meaning
                == "found no bootable device")
        #expect(ConsoleWatch.firmwareGaveUp("SeaBIOS (version 1.16.3)\r\nBooting from Hard Disk...\r\n") == nil)
    }

    @Test("a boot that failed for good: the initramfs rescue shell, a kernel panic, dracut; only as the last line")
    func bootFailed() throws {
        // Recorded from a qcow2 image cut off at 64 MiB: fsck fails on I/O errors.
        let fsck = try fixture("initramfs-fsck-failed.log")
        let found = try #require(ConsoleWatch.bootFailed(fsck))
        #expect(found.line == "The root filesystem on /dev/vda2 requires a manual fsck")
        #expect(found.meaning.contains("initramfs gave up"))
        #expect(
            ConsoleWatch.bootFailedMessage(found, image: "/i.qcow2")
                == "the guest stopped booting from the image /i.qcow2: its initramfs gave up and waits at its rescue "
                + "shell, \"(initramfs)\", after \"The root filesystem on /dev/vda2 requires a manual fsck\" on the serial "
                + "console")
        // The kernel logging after the prompt, with terminal escapes about: still the prompt.
        let later = fsck + "\u{1B}[0m[   12.345678] I/O error, dev vda, sector 919552\r\n"
        #expect(ConsoleWatch.bootFailed(later)?.line == "The root filesystem on /dev/vda2 requires a manual fsck")
        // Someone typing at that shell, or a boot that went on: not (or no longer) failed.
        #expect(ConsoleWatch.bootFailed(fsck + "ls\r\nbin  dev  etc\r\n") == nil)
        let panic = """
            [    1.803211] VFS: Cannot open root device "UUID=1234" or unknown-block(0,0): error -6\r
            [    1.804016] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r
            [    1.804710] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0-50-amd64 #1  Debian 6.1.176-1\r
            [    1.805500]  </TASK>\r
            [    1.806100] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0) ]---\r

            """
        let panicked = try #require(ConsoleWatch.bootFailed(panic))
        #expect(panicked.meaning == "its kernel panicked")
        #expect(
            panicked.line.hasSuffix("Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"))
        // panic=N: the kernel reboots and the firmware prints on.
        #expect(ConsoleWatch.bootFailed(panic + "BdsDxe: loading Boot0001 \"UEFI Misc Device\"\r\n") == nil)
        #expect(
            ConsoleWatch.bootFailed("Entering emergency mode. Exit the shell to continue.\r\ndracut:/# ")?.meaning
                == "its initramfs (dracut) gave up and waits at its emergency shell")
        // The timer check that fails on a starved vCPU: the message says what helps.
        let timer = try #require(
            ConsoleWatch.bootFailed(
                "[    0.1] Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with apic=debug\r\n"
                    + "[    0.2] ---[ end Kernel panic - not syncing: IO-APIC + timer doesn't work! ]---\r\n"))
        #expect(ConsoleWatch.bootFailedMessage(timer, image: "/i").contains("no_timer_check"))
        // A whole Debian boot to its login prompt, kernel lines and all.
        let booted = """
            [    5.577699] systemd[1]: Reached target multi-user.target\r
            \u{1B}[0;32m  OK  \u{1B}[0m] Started serial-getty@ttyS0.service\r

            Debian GNU/Linux 12 debusine-test ttyS0\r

            debusine-test login:\u{20}
            """
        #expect(ConsoleWatch.bootFailed(booted) == nil)
        // A boot still in the firmware and GRUB, and nothing at all.
        #expect(ConsoleWatch.bootFailed(try fixture("ovmf-good-boot.log")) == nil)
        #expect(ConsoleWatch.bootFailed("") == nil)
    }

    @Test("OVMF trying the network after the disk is recognised at iPXE's banner, before any PXE timeout")
    func firmwareNetworkBoot() throws {
        let found = try #require(ConsoleWatch.firmwareGaveUp(try fixture("ovmf-network-boot.log")))
        #expect(found.meaning == "tried to boot from the network (iPXE)")
        #expect(found.line.hasPrefix("iPXE 1.0.0"), "\(found.line)")
        #expect(
            ConsoleWatch.firmwareGaveUp(">>Start PXE over IPv4.\r\n")?.meaning == "tried to boot from the network (PXE)"
        )
        #expect(
            ConsoleWatch.firmwareGaveUp("\r\n>>Start HTTP Boot over IPv6.\r\n")?.meaning
                == "tried to boot from the network (HTTP boot)")
        #expect(
            ConsoleWatch.firmwareGaveUp("BdsDxe: No bootable option or device was found.\r\n")?.meaning
                == "found no bootable option or device")
        #expect(
            ConsoleWatch.firmwareGaveUp("\u{1B}[1m\u{1B}[33mShell> \u{1B}[0m")?.meaning == "fell back to its UEFI shell"
        )
    }

    @Test("a good boot, and a failed load that another disk may follow, are not a firmware giving up")
    func firmwareBooting() throws {
        #expect(ConsoleWatch.firmwareGaveUp(try fixture("ovmf-good-boot.log")) == nil)
        #expect(
            ConsoleWatch.firmwareGaveUp(
                "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x3,0x0): Not Found\r\n"
                    + "BdsDxe: loading Boot0002 \"UEFI Misc Device 2\" from PciRoot(0x0)/Pci(0x5,0x0)\r\n") == nil)
        #expect(ConsoleWatch.withoutTerminalEscapes("\u{1B}[2J\u{1B}[01;01H\u{1B}[=3hBdsDxe") == "BdsDxe")
    }
}

@Suite("The serial console's log on the disk")
struct ConsoleLogTests {
    @Test("a log written on at its offset, as QEMU does, stays within its limit on the disk and keeps its end")
    func staysBounded() async throws {
        let directory = try TestPaths.makeTemporaryDirectory("dv-console.")
        defer { TestPaths.removeTree(directory) }
        let path = "\(directory)/console.log"
        // QEMU opens its log file once, without O_APPEND, and writes on from where it is.
        let writer = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(writer >= 0)
        defer { close(writer) }
        let consoleLog = ConsoleLog(path: path, limit: 1 << 20, runner: SubprocessRunner())
        let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 256 << 10)
        var trims = 0
        var largest = 0
        var lastCut = 0
        for _ in 0..<64 {
            #expect(chunk.withUnsafeBytes { write(writer, $0.baseAddress, $0.count) } == chunk.count)
            if await consoleLog.trim(after: &lastCut) != nil { trims += 1 }
            var info = stat()
            #expect(stat(path, &info) == 0)
            largest = max(largest, Int(info.st_blocks) * 512)
        }
        // Invalid UTF-8 at the end, as a guest may write: decoded, not dropped.
        let end: [UInt8] = Array("the end \u{FC} ".utf8) + [0xFF, 0xFE] + Array(" last line\n".utf8)
        #expect(end.withUnsafeBytes { write(writer, $0.baseAddress, $0.count) } == end.count)
        var info = stat()
        #expect(stat(path, &info) == 0)
        #expect(Int(info.st_size) == 64 * chunk.count + end.count, "the file goes on at QEMU's offset")
        #expect(trims >= 10)
        // The limit, a quarter of it before the next cut, and one write (plus what a file system
        // allocates ahead).
        #expect(largest <= 2 << 20, "more than twice the limit on the disk: \(largest)")
        let tail = ConsoleLog.tail(of: path, characters: 30)
        #expect(tail.hasSuffix("the end \u{FC} \u{FFFD}\u{FFFD} last line\n"), "\(tail)")
        #expect(ConsoleLog.tail(of: "\(directory)/missing", characters: 30) == "")
    }

    @Test("fallocate punches a hole from the start of the file, by argv")
    func punchHoleCommand() {
        #expect(
            ConsoleLog.punchHole("/tmp/d/console.log", length: 8192).argv == [
                "fallocate", "--punch-hole", "--offset", "0", "--length", "8192", "--", "/tmp/d/console.log",
            ])
    }
}

/// What the image cache keeps when a URL's image does not fit the `--boot` asked for.
@Suite("Boot images from URLs")
struct BootImageTests {
    @Test(
        "an image the asked firmware cannot boot, but the other can, is refused and stays cached; one neither boots is removed"
    )
    func askedFirmwareKeepsTheEntry() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-boot-image.")
        defer { TestPaths.removeTree(work) }
        try await TestDisks.raw("\(work)/esp.raw", size: 4 << 20, layout: .mbrWithESP)
        try await TestDisks.raw("\(work)/none.raw", size: 4 << 20, layout: .mbrWithoutESP)
        let cache = "\(work)/cache"
        let cached = { TestPaths.contents(of: cache).filter { !$0.hasPrefix(".") && !$0.hasSuffix(".lock") } }
        let refused = await #expect(throws: VirtError.self) {
            _ = try await BootImage.prepare(
                "file://\(work)/esp.raw", sha256: nil, cacheDirectory: cache, boot: .firmware(.bios))
        }
        #expect(
            refused?.message.contains("(it has an EFI system partition: --boot efi)") == true,
            "\(refused?.message ?? "")")
        let kept = cached()
        #expect(!kept.isEmpty, "an image EFI boots was removed from the cache for a --boot bios")
        let efi = try await BootImage.prepare(
            "file://\(work)/esp.raw", sha256: nil, cacheDirectory: cache, boot: .firmware(.efi))
        #expect(efi.firmware == .efi)
        #expect(cached() == kept, "the same entry serves the EFI boot")
        await #expect(throws: VirtError.self) {
            _ = try await BootImage.prepare(
                "file://\(work)/none.raw", sha256: nil, cacheDirectory: cache, boot: .firmware(.efi))
        }
        #expect(cached() == kept, "an image no firmware boots is not kept")
    }
}
