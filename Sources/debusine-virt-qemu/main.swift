import ArgumentParser
import ImageCache
import QemuBackend
import VirtCore
import VirtSession

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// `debusine-virt-qemu [options] IMAGE`: the autopkgtest virt server for QEMU system images.
@main
struct QemuServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debusine-virt-qemu",
        abstract: "autopkgtest virtualization server running a QEMU VM from a system image.",
        discussion: """
            Boots IMAGE (qcow2 or raw, EFI, never modified: every boot gets a fresh qcow2 overlay) \
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
            instance directories in $TMPDIR) and reports it.
            """
    )

    /// `debusine-virt-qemu gc` is taken before argument parsing, where it would read as an image.
    static func main() async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if arguments == ["gc"] || arguments == ["gc", "--help"] {
            if arguments.count == 2 {
                Log.writeToStandardError(
                    "usage: debusine-virt-qemu gc\n\nRemoves the QEMU processes and instance directories that servers "
                        + "which died left in $TMPDIR (default /tmp), and says what it removed.\n")
                Glibc.exit(0)
            }
            let parent = PrivateDirectory.temporaryParent
            let report = QemuGarbageCollector.collect(parent: parent)
            let text = report.isEmpty ? "nothing to remove in \(parent)\n" : report.joined(separator: "\n") + "\n"
            _ = text.withCString { write(1, $0, strlen($0)) }
            Glibc.exit(report.contains { $0.hasPrefix("could not") } ? 1 : 0)
        }
        await Self.main(arguments)
    }

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Option(help: "Memory of the VM in MiB.")
    var ramSize = 2048

    @Option(help: "Number of virtual CPUs.")
    var cpus = 2

    @Option(help: "Accelerator: auto (KVM only when it can really run guests, else TCG), kvm or tcg.")
    var accel: QemuOptions.Accelerator = .auto

    @Option(help: "EFI firmware code (read-only pflash).")
    var efiCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"

    @Option(help: "EFI variables template; each instance gets its own copy.")
    var efiVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"

    @Option(help: "Guest network: user (QEMU user networking: the guest reaches what the host reaches), or none.")
    var network: QemuOptions.Network = .user

    @Option(help: "Seconds to wait for the guest to boot (guest agent answering).")
    var bootTimeout = 300

    @Option(help: "Seconds a guest gets to shut down before QEMU is stopped.")
    var shutdownTimeout = 30

    @Option(help: "The QEMU system emulator to run.")
    var qemu = "qemu-system-x86_64"

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

    @Argument(help: "The system image: a path to a qcow2 or raw EFI image, or an http(s):// or file:// URL of one.")
    var image: String

    func run() async throws {
        VirtServer.prepareProcess(program: "debusine-virt-qemu", debug: debug)
        do {
            let testbed = try QemuTestbed(options: try await options(), auxverbExecutable: try auxverbExecutable())
            await VirtServer.serve(testbed)
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
        for (what, path) in [("EFI firmware", efiCode), ("EFI variables template", efiVars)]
        where access(path, R_OK) != 0 {
            throw VirtError(
                .notFound, "the \(what) \(path) is missing: apt-get install ovmf, or pass --efi-code/--efi-vars")
        }
        guard ramSize >= 128, cpus >= 1, bootTimeout > 0, shutdownTimeout >= 0 else {
            throw VirtError(.usage, "--ram-size, --cpus and the timeouts must be positive")
        }
        guard Self.findExecutable(qemu) else {
            throw VirtError(.unavailable, "\(qemu) was not found: apt-get install qemu-system-x86")
        }
        // Fetched if a URL, and inspected either way: an image that must not boot is refused here.
        let inspected = try await BootImage.prepare(
            isURL ? image : absolute(image), name: image, sha256: sha256, cacheDirectory: cacheDir)
        var options = QemuOptions(image: inspected)
        options.ramMiB = ramSize
        options.cpus = cpus
        options.accelerator = accel
        options.efiCode = absolute(efiCode)
        options.efiVars = absolute(efiVars)
        options.network = network
        options.bootTimeout = .seconds(bootTimeout)
        options.shutdownTimeout = .seconds(shutdownTimeout)
        options.qemu = qemu
        options.extraArguments = qemuOptions
        options.stateCache = snapshot ? ImageCache(directory: cacheDir).directory : nil
        return options
    }

    /// debusine-virt-auxverb, installed next to this executable.
    func auxverbExecutable() throws(VirtError) -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else { throw VirtError(.internalError, "cannot find my own executable") }
        let own = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let path = String(own[..<(own.lastIndex(of: "/") ?? own.startIndex)]) + "/debusine-virt-auxverb"
        guard access(path, X_OK) == 0 else {
            throw VirtError(.notFound, "\(path) is missing: install debusine-virt-auxverb next to debusine-virt-qemu")
        }
        guard !path.contains(","), !path.contains("%") else {
            // autopkgtest splits the auxverb on commas after percent-decoding.
            throw VirtError(.unavailable, "install debusine-virt in a path without `,' or `%' (now \(path))")
        }
        return path
    }

    func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return path }
        return String(cString: buffer) + "/" + path
    }

    static func findExecutable(_ name: String) -> Bool {
        if name.contains("/") { return access(name, X_OK) == 0 }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        return path.split(separator: ":").contains { access("\($0)/\(name)", X_OK) == 0 }
    }
}

extension QemuOptions.Accelerator: ExpressibleByArgument {}
extension QemuOptions.Network: ExpressibleByArgument {}
