import ArgumentParser
import CommandRunner
import ImageCache
import QemuBackend
import TestbedCore
import VirtCore
import VirtSession

/// `debusine-virt-qemu [serve] [options] IMAGE` and `debusine-virt-qemu gc`.
@main
struct QemuCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debusine-virt-qemu",
        abstract: "autopkgtest virtualization server running a QEMU VM from a system image.",
        discussion: """
            Without a command name, `serve` runs: debusine-virt-qemu [options] IMAGE. \
            --help shows its options; `debusine-virt-qemu help gc` those of gc.
            """,
        subcommands: [QemuServer.self, GCCommand.self, CheckStatesCommand.self],
        defaultSubcommand: QemuServer.self,
        // No help flag of its own: `debusine-virt-qemu --help` is the server's, as with
        // autopkgtest-virt-qemu. `help` still lists the commands.
        helpNames: []
    )
}

/// `debusine-virt-qemu [serve] [options] IMAGE`: the autopkgtest virt server for QEMU system images.
struct QemuServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the autopkgtest virt-server protocol with a VM of IMAGE (the default command).",
        discussion: """
            Boots IMAGE (qcow2 or raw, EFI or BIOS, never modified: every boot gets a fresh qcow2 \
            overlay) \
            and serves the autopkgtest virt-server protocol on stdin/stdout. The image needs \
            python3-minimal and qemu-guest-agent; an image without the agent that boots to a login \
            prompt on the serial console where root logs in without a password (as Debian's nocloud \
            images) gets it installed there with apt-get, which needs network access to an archive. \
            Use it as: autopkgtest PACKAGE -- debusine-virt-qemu IMAGE

            IMAGE may be an http://, https:// or file:// URL: it is then downloaded once into the \
            image cache (see --cache-dir), which concurrent servers share; the least recently used \
            images are removed beyond DEBUSINE_VIRT_CACHE_MAX bytes (default 20 GiB).

            The first boot of an image saves the booted VM (its memory, devices and disk) in the \
            cache's states/ directory; later opens and every revert restore it, in about a second, \
            instead of booting. A restored guest gets the host's clock and fresh entropy; its boot \
            id and machine id are those of the saved boot. A state is only used by the exact same \
            QEMU, command line, image, firmware and guest helper, is checked against its SHA-256 \
            sums before each use, and is rebuilt when it does not match. --no-snapshot boots \
            every time.

            debusine-virt-qemu gc removes what servers that died left behind (QEMU processes, \
            instance directories in $TMPDIR and their --overlay-dir directories) and reports it.

            It takes autopkgtest-virt-qemu's options (autopkgtest 5.49) with the same meaning, so \
            that changing the server's name keeps the rest of the command line: --ram-size, -c, \
            --boot, --efi, --dpkg-architecture, --qemu-architecture, -q, --qemu-options, -o, \
            --timeout-reboot, --show-boot, --timeout-poweroff, -d, -u, -p, --baseimage and more \
            images after the first (attached read-only, in order). What this server cannot boot \
            yet (another architecture than x86_64, i386 and aarch64, --boot ieee1275 or none) is an error \
            before the banner.

            \(StatisticsFile.manual)
            """,
        helpNames: .shortAndLong
    )

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Option(help: "Memory of the VM in MiB.")
    var ramSize = 2048

    @Option(
        name: [.customShort("c", allowingJoined: true), .long],
        help: "Number of virtual CPUs (autopkgtest-virt-qemu's default is 1).")
    var cpus = 2

    @Option(
        help: ArgumentHelp(
            "How the VM boots: efi (EFI firmware, see --efi-code), bios (QEMU's SeaBIOS), or auto (the default): "
                + "EFI when the image has an EFI system partition, else BIOS when its first sector has boot code. "
                + "ieee1275 and none are not supported yet.",
            valueName: "auto|bios|efi|ieee1275|none"))
    var boot: BootMode?

    @Flag(help: "Alias for --boot efi (the last of --efi and --boot wins).")
    var efi = false

    @Option(
        help: ArgumentHelp(
            "The guest's architecture in dpkg's terms (default: the host's): amd64, i386 or arm64 so far.",
            valueName: "arch"))
    var dpkgArchitecture: String?

    @Option(
        help: ArgumentHelp(
            "The guest's architecture in QEMU's terms, before --dpkg-architecture (default: the host's): x86_64, "
                + "i386 or aarch64 so far.",
            valueName: "arch"))
    var qemuArchitecture: String?

    @Option(help: "Accelerator: auto (KVM only when it can really run guests, else TCG), kvm or tcg.")
    var accel: QemuOptions.Accelerator = .auto

    @Option(
        help: ArgumentHelp(
            "EFI firmware code (read-only pflash; default: OVMF's, /usr/share/OVMF/OVMF_CODE_4M.fd for x86_64, "
                + "OVMF32_CODE_4M.secboot.fd for i386).",
            valueName: "path"))
    var efiCode: String?

    @Option(
        help: ArgumentHelp(
            "EFI variables template; each instance gets its own copy (default: OVMF's, OVMF_VARS_4M.fd for x86_64, "
                + "OVMF32_VARS_4M.fd for i386).",
            valueName: "path"))
    var efiVars: String?

    @Option(help: "Guest network: user (QEMU user networking: the guest reaches what the host reaches), or none.")
    var network: QemuOptions.Network = .user

    @Option(help: "Seconds to wait for the guest to boot (guest agent answering) at open and revert (default: 300).")
    var bootTimeout: Int?

    @Option(
        help: ArgumentHelp(
            "Seconds to wait for a reboot, and for boots unless --boot-timeout is given (default: 300).",
            valueName: "seconds"))
    var timeoutReboot: Int?

    @Option(
        name: [.customLong("shutdown-timeout"), .customLong("timeout-poweroff")],
        help: ArgumentHelp(
            "Seconds a guest gets to power off (asked through the guest agent) before QEMU is stopped.",
            valueName: "seconds"))
    var shutdownTimeout = 30

    @Option(
        name: [.customShort("q", allowingJoined: true), .customLong("qemu-command"), .customLong("qemu")],
        help: ArgumentHelp(
            "The QEMU system emulator to run (default: qemu-system-x86_64; qemu-system-i386 for i386).",
            valueName: "command"))
    var qemu: String?

    @Option(
        name: .customLong("qemu-options"), parsing: .unconditional,
        help: ArgumentHelp(
            "Extra QEMU arguments in one string, split on whitespace as autopkgtest-virt-qemu splits it (no "
                + "quoting); they come before those of --qemu-option.",
            valueName: "string"))
    var qemuOptionsString: String?

    @Option(
        name: [.customShort("o", allowingJoined: true), .customLong("overlay-dir")],
        help: ArgumentHelp(
            "Where the boot disk's overlay is written (e.g. a tmpfs), in a private directory removed at close "
                + "(default: the instance directory in $TMPDIR).",
            valueName: "dir"))
    var overlayDir: String?

    @Flag(help: "Copy the serial console to stderr while the guest boots or reboots.")
    var showBoot = false

    @Option(
        help: ArgumentHelp(
            "How much of the serial console's log (console.log in the instance directory) is kept on the disk; "
                + "what the guest writes past it pushes out the oldest part.",
            valueName: "MiB"))
    var consoleLogLimit = ConsoleLog.defaultLimit >> 20

    @Option(
        name: [.customShort("u", allowingJoined: true), .long],
        help: ArgumentHelp(
            "The user for tests that do not need root (suggested-normal-user), unless root; also who logs in on the "
                + "serial console to install qemu-guest-agent (default: root; another user needs sudo).",
            valueName: "user"))
    var user: String?

    @Option(
        name: [.customShort("p", allowingJoined: true), .long],
        help: ArgumentHelp(
            "The password of --user for that console login, and for sudo (default: none).", valueName: "password"))
    var password: String?

    @Flag(
        help:
            "A read-only copy of the (first) image in the guest as /dev/baseimage (not between reboot-prepare and the next boot)."
    )
    var baseimage = false

    @Option(
        name: .customLong("qemu-option"), parsing: .unconditionalSingleValue,
        help: ArgumentHelp(
            "An extra QEMU argument, appended to its command line as it is; repeat it for each argument, "
                + "e.g. --qemu-option -device --qemu-option virtio-net-pci,netdev=n0.",
            valueName: "arg"))
    var qemuOptions: [String] = []

    @Option(
        help: ArgumentHelp(
            "Verify a downloaded IMAGE against this SHA-256 (64 hex digits); a mismatch is an error.",
            valueName: "hex"))
    var sha256: String?

    @Option(
        help: ArgumentHelp(
            "Where downloaded images and saved VM states are kept (default: $DEBUSINE_VIRT_CACHE, else "
                + "$XDG_CACHE_HOME/debusine-virt/images, else ~/.cache/debusine-virt/images).",
            valueName: "dir"))
    var cacheDir: String?

    @Flag(
        inversion: .prefixedNo, exclusivity: .chooseLast,
        help:
            "Save the first boot and restore it at opens and reverts; --no-snapshot boots every time and saves nothing."
    )
    var snapshot = true

    @Option(help: ArgumentHelp(StatisticsFile.optionHelp, valueName: "path"))
    var statisticsFile: String?

    @Argument(
        help: "The system image: a path to a qcow2 or raw EFI or BIOS image, or an http(s):// or file:// URL of one.")
    var image: String

    @Argument(
        help: ArgumentHelp("More disk images, attached read-only in this order (vdb, vdc, ...).", valueName: "image"))
    var extraImages: [String] = []

    func run() async throws {
        VirtServer.prepareProcess(program: "debusine-virt-qemu", debug: debug)
        do {
            // First: a mistyped path should not have to wait for an image download to be reported.
            let statistics = try statisticsFile.map { (path) throws(VirtError) in
                try StatisticsFile(path: path, backend: "qemu", image: image)
            }
            let testbed = try QemuTestbed(options: try await options(), auxverbExecutable: try auxverbExecutable())
            await VirtServer.serve(
                testbed, cleanupAfterDeath: ["gc", "--owner", String(getpid())], statistics: statistics)
        } catch {
            VirtServer.failBeforeBanner(error)
        }
    }

    /// Validates everything that can be checked before the banner, so a bad command line never
    /// looks like a working server. An image URL is fetched last: a mistyped option should not
    /// have to wait for a download to be reported.
    func options() async throws(VirtError) -> QemuOptions {
        let isURL = ImageCache.isURL(image)
        if !isURL {
            if image.contains("://") {
                throw VirtError(.usage, "the image URL \(image) is not supported: use http://, https:// or file://")
            }
            guard sha256 == nil else {
                throw VirtError(.usage, "--sha256 verifies downloaded images: \(image) is not a URL")
            }
            guard access(image, R_OK) == 0 else {
                throw VirtError(.notFound, "the image \(image) does not exist or is not readable")
            }
        }
        if let sha256, !ImageCache.isDigest(sha256) {
            throw VirtError(.usage, "--sha256 must be 64 hexadecimal digits, not \(sha256)")
        }
        // Cheap, and the firmware's defaults depend on it; the rest of autopkgtest-virt-qemu's
        // options (which inspect extra images) come after the plain usage checks.
        let architecture = try AutopkgtestQemu.architecture(qemu: qemuArchitecture, dpkg: dpkgArchitecture)
        let mode = AutopkgtestQemu.bootMode(boot: boot, efi: efi, arguments: Array(CommandLine.arguments.dropFirst()))
        let bootCheck = try AutopkgtestQemu.bootCheck(
            mode, efiFirmwareGiven: self.efiCode != nil || self.efiVars != nil, architecture: architecture)
        let efiCode = efiCode ?? architecture.efiCode
        let efiVars = efiVars ?? architecture.efiVars
        // EFI's files: before the image when the boot is EFI for sure, after it when the image decides.
        let checkEFIFiles = { () throws(VirtError) in
            for (what, path) in [("EFI firmware", efiCode), ("EFI variables template", efiVars)]
            where access(path, R_OK) != 0 {
                throw VirtError(
                    .notFound,
                    "the \(what) \(path) is missing: apt-get install \(architecture.firmwarePackage), or pass "
                        + "--efi-code/--efi-vars")
            }
        }
        if bootCheck == .firmware(.efi) { try checkEFIFiles() }
        guard (1...(1 << 20)).contains(consoleLogLimit) else {
            throw VirtError(.usage, "--console-log-limit must be between 1 and 1048576 MiB")
        }
        guard ramSize >= 128, cpus >= 1, shutdownTimeout >= 0 else {
            throw VirtError(.usage, "--ram-size, --cpus and the timeouts must be positive")
        }
        let dropIn = try await autopkgtestOptions()
        let qemu = self.qemu ?? architecture.qemuCommand
        guard await Executables.exist(qemu) else {
            throw VirtError(.unavailable, "\(qemu) was not found: apt-get install \(architecture.qemuPackage)")
        }
        // Fetched if a URL, and inspected either way: an image that must not boot is refused here.
        let inspected = try await BootImage.prepare(
            isURL ? image : absolute(image), name: image, sha256: sha256, cacheDirectory: cacheDir, boot: bootCheck)
        if bootCheck == .auto {
            if inspected.firmware == .bios {
                log.info("the image has no EFI system partition: booting it with BIOS (SeaBIOS)")
            } else {
                try checkEFIFiles()
            }
        }
        var options = QemuOptions(image: inspected)
        options.imageIsCached = isURL
        options.ramMiB = ramSize
        options.cpus = cpus
        options.accelerator = accel
        options.architecture = architecture
        options.efiCode = absolute(efiCode)
        options.efiVars = absolute(efiVars)
        options.network = network
        options.bootTimeout = dropIn.timeouts.boot
        options.rebootTimeout = dropIn.timeouts.reboot
        options.shutdownTimeout = .seconds(shutdownTimeout)
        options.qemu = qemu
        options.extraArguments = AutopkgtestQemu.splitLikePython(qemuOptionsString ?? "") + qemuOptions
        options.extraImages = dropIn.extraImages
        options.baseImage = baseimage
        options.overlayParent = dropIn.overlayParent
        options.showBoot = showBoot
        options.consoleLogLimit = consoleLogLimit << 20
        options.consoleUser = user
        options.consolePassword = password
        options.stateCache = snapshot ? ImageCache(directory: cacheDir).directory : nil
        return options
    }

    /// autopkgtest-virt-qemu's options that need checking before the banner: what this server
    /// cannot serve yet is refused here, naming the option and its value.
    func autopkgtestOptions() async throws(VirtError) -> (
        timeouts: (boot: Duration, reboot: Duration), extraImages: [AttachedImage],
        overlayParent: String?
    ) {
        let timeouts = try AutopkgtestQemu.timeouts(bootTimeout: bootTimeout, timeoutReboot: timeoutReboot)
        // Typed on the serial console: a line break would end it early.
        if let password, password.contains(where: { $0.isNewline }) {
            throw VirtError(.usage, "--password must be one line")
        }
        // Also advertised as `suggested-normal-user=`, one word of the capabilities reply.
        if let user,
            user.isEmpty
                || user.contains(where: {
                    $0.isWhitespace || $0.unicodeScalars.contains { $0.properties.generalCategory == .control }
                })
        {
            throw VirtError(
                .usage, "--user must be a user name, without spaces or control characters: \(user.debugDescription)")
        }
        var extras: [AttachedImage] = []
        for path in extraImages {
            guard !path.contains("://") else {
                throw VirtError(
                    .usage, "the extra image \(path) must be a local file: only the first image may be a URL")
            }
            guard access(path, R_OK) == 0 else {
                throw VirtError(.notFound, "the image \(path) does not exist or is not readable")
            }
            // Inspected like the boot disk (a backing file would show the guest a host file), but
            // any disk will do: no partition table is required.
            let inspected = try await ImageInspection().inspect(
                absolute(path), name: path, boot: .none)
            extras.append(AttachedImage(path: inspected.path, format: inspected.format))
        }
        var overlayParent: String?
        if let overlayDir {
            var info = stat()
            guard stat(overlayDir, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
                throw VirtError(.notFound, "--overlay-dir \(overlayDir) is not a directory")
            }
            guard access(overlayDir, W_OK | X_OK) == 0 else {
                throw VirtError(.usage, "--overlay-dir \(overlayDir) is not writable")
            }
            overlayParent = absolute(overlayDir)
        }
        return (timeouts, extras, overlayParent)
    }

    func auxverbExecutable() throws(VirtError) -> String {
        try VirtServer.auxverbExecutable(besides: "debusine-virt-qemu")
    }

    func absolute(_ path: String) -> String { AbsolutePath.of(path) }
}

extension QemuOptions.Accelerator: ExpressibleByArgument {}
extension BootMode: ExpressibleByArgument {}
extension QemuOptions.Network: ExpressibleByArgument {}

/// `debusine-virt-qemu gc`: what servers that died left behind, removed and reported.
struct GCCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Remove what debusine-virt-qemu servers that died left behind, and say what.",
        discussion: """
            Removes the QEMU processes and instance directories that servers which died left in \
            $TMPDIR (default /tmp), with their --overlay-dir directories.
            """,
        helpNames: .shortAndLong
    )

    @Option(
        help: ArgumentHelp(
            "Only what this server left, once it has ended (what a server's death watch runs).",
            visibility: .hidden))
    var owner: Int32?

    func run() async throws {
        Log.shared.configure(program: "debusine-virt-qemu", debug: false)
        let parent = PrivateDirectory.temporaryParent
        if let owner {
            _ = LiveProcess.waitForEnd(of: owner, seconds: 60)
            for line in QemuGarbageCollector.collect(parent: parent, owner: owner) {
                log.warning("the server (pid \(owner)) died without cleaning up: \(line)")
            }
            return
        }
        let report = QemuGarbageCollector.collect(parent: parent)
        let text = report.isEmpty ? "nothing to remove in \(parent)\n" : report.joined(separator: "\n") + "\n"
        printResult(text)
        if report.contains(where: { $0.hasPrefix("could not") }) { Glibc.exit(1) }
    }
}

/// `debusine-virt-qemu check-states`: every saved VM state hashed, and the corrupt ones removed.
struct CheckStatesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-states",
        abstract: "Hash every saved VM state in the cache; remove the ones that do not match.",
        discussion: """
            An open takes a saved state's files as saved while their size, inode and modification \
            and change times are those recorded when it was saved, and hashes only the others. \
            This command hashes every file of every state against its SHA256SUMS, prints one line \
            per state, and removes a state that does not match (its next open boots and saves it \
            again). Exit status 1 when one did not match.
            """,
        helpNames: .shortAndLong
    )

    @Option(
        help: ArgumentHelp(
            "The cache to check (default: as for serve's --cache-dir).", valueName: "dir"))
    var cacheDir: String?

    func run() async throws {
        Log.shared.configure(program: "debusine-virt-qemu", debug: false)
        let store = StateStore(cacheDirectory: ImageCache(directory: cacheDir).directory)
        let results = await store.checkAll()
        var text = results.isEmpty ? "no saved VM states in \(store.directory)\n" : ""
        for result in results {
            text += result.failure.map { "removed \(result.path): \($0)\n" } ?? "ok \(result.path)\n"
        }
        printResult(text)
        if results.contains(where: { $0.failure != nil }) { Glibc.exit(1) }
    }
}

/// What gc and check-states report goes to stdout whole; a closed stdout loses only the report.
func printResult(_ text: String) {
    try? writeAll(1, Array(text.utf8), "cannot write to stdout")
}
