import ArgumentParser
import VirtCore
import VirtSession

/// `debusine-virt-incus artifact/ID`: the autopkgtest virt server for Incus containers and VMs.
@main
struct IncusServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debusine-virt-incus",
        abstract: "autopkgtest virtualization server running an Incus container or VM.",
        discussion: """
            Not functional yet: this build carries the protocol core only, and the Incus backend \
            is still being written. It refuses to start rather than pretend to work.
            """
    )

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Flag(help: "Run a virtual machine instead of a container.")
    var vm = false

    @Argument(help: "The image alias to launch, e.g. artifact/42.")
    var image: String

    func run() async throws {
        VirtServer.prepareProcess(program: "debusine-virt-incus", debug: debug)
        VirtServer.failBeforeBanner(
            VirtError(.unavailable, "the Incus backend is not available yet in this build; nothing was started"))
    }
}
