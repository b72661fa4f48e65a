import ArgumentParser
import FixtureBackend
import VirtCore
import VirtSession

/// A virt server whose testbed is a private directory on the host. It exists for the test suite:
/// it runs the real session loop, stdio and signal handling in a real process.
@main
struct FixtureServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virt-fixture-server",
        abstract: "Serve the virt-server protocol over a host-directory testbed (for tests only)."
    )

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Option(name: .customLong("fixture"), help: "A fixture option KEY=VALUE (caps, fail-open, open-delay, ...).")
    var fixtureOptions: [String] = []

    func run() async throws {
        VirtServer.prepareProcess(program: "virt-fixture-server", debug: debug)
        let options: FixtureTestbed.Options
        do {
            options = try FixtureTestbed.Options(words: fixtureOptions)
        } catch {
            VirtServer.failBeforeBanner(error)
        }
        await VirtServer.serve(FixtureTestbed(options: options))
    }
}
