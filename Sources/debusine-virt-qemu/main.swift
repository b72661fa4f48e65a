#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif
import ArgumentParser
import AuxverbClient
import VirtCore
import VirtSession

/// `debusine-virt-qemu IMAGE`: the autopkgtest virt server for QEMU system images.
@main
struct QemuServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debusine-virt-qemu",
        abstract: "autopkgtest virtualization server running a QEMU VM from a system image.",
        discussion: """
            Not functional yet: this build carries the protocol core only, and the QEMU backend \
            is still being written. It refuses to start rather than pretend to work.
            """
    )

    /// The auxverb mode (`debusine-virt-qemu --auxverb SOCKET COMMAND...`) is decided before
    /// argument parsing: it runs for every command a client sends and the command's own
    /// arguments must pass through untouched.
    static func main() async {
        let arguments = CommandLine.arguments
        if arguments.count >= 2 && arguments[1] == "--auxverb" {
            guard arguments.count >= 4 else {
                VirtServer.failBeforeBanner(VirtError(.usage, "usage: --auxverb SOCKET COMMAND [ARG...]"))
            }
            Glibc.exit(AuxverbClient.run(socketPath: arguments[2], argv: Array(arguments.dropFirst(3))))
        }
        await Self.main(Array(arguments.dropFirst()))
    }

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Argument(help: "Path of the qcow2 or raw system image to boot.")
    var image: String

    func run() async throws {
        VirtServer.prepareProcess(program: "debusine-virt-qemu", debug: debug)
        VirtServer.failBeforeBanner(
            VirtError(.unavailable, "the QEMU backend is not available yet in this build; nothing was started"))
    }
}
