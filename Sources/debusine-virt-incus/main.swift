import ArgumentParser
import CommandRunner
import IncusBackend
import TestbedCore
import VirtCore
import VirtSession

/// `debusine-virt-incus [serve] [options] artifact/ID`, `setup`, `import` and `gc`.
@main
struct IncusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debusine-virt-incus",
        abstract: "autopkgtest virtualization server running an Incus container or VM.",
        discussion: """
            Without a command name, `serve` runs: debusine-virt-incus [options] IMAGE. \
            --help shows its options; `debusine-virt-incus help COMMAND` those of the others.
            """,
        subcommands: [IncusServer.self, SetupCommand.self, ImportCommand.self, GCCommand.self],
        defaultSubcommand: IncusServer.self,
        // No help flag of its own: `debusine-virt-incus --help` is the server's, as with
        // autopkgtest-virt-incus. `help` still lists the commands.
        helpNames: []
    )
}

/// `debusine-virt-incus [serve] [options] artifact/ID`: the autopkgtest virt server for Incus.
struct IncusServer: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the autopkgtest virt-server protocol with instances of IMAGE (the default command).",
        discussion: """
            Launches an ephemeral instance of IMAGE (an alias such as artifact/42, made by \
            `debusine-virt-incus import`) with the debusine profile and serves the autopkgtest \
            virt-server protocol on stdin/stdout. Use it as: \
            autopkgtest PACKAGE -- debusine-virt-incus artifact/42

            Other commands (each has --help):
              debusine-virt-incus setup [--check]   make this Incus host ready (network, pool, profile)
              debusine-virt-incus import --artifact-id ID FILE   import a system tarball or image
              debusine-virt-incus gc                delete instances whose server died

            It takes autopkgtest-virt-incus's command line (autopkgtest 5.49) with the same \
            meaning: -d, -r/--remote, --vm, --incus, the image, and `incus launch` arguments after \
            it (with or without --), which go to every instance the server makes. Those that \
            repeat what the server sets itself (--profile debusine, --ephemeral, --vm, its \
            --target) are merged rather than given twice. The server's own options go before the \
            image.

            \(StatisticsFile.manual)
            """,
        helpNames: .shortAndLong
    )

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Flag(help: "Run a virtual machine (isolation-machine) instead of a container.")
    var vm = false

    @Flag(help: "Use Incus (autopkgtest-virt-incus's option; this server always does).")
    var incus = false

    @Flag(help: "Use LXD: not supported, this server runs Incus only.")
    var lxd = false

    @Option(
        name: [.customShort("r", allowingJoined: true), .long],
        help: "The Incus remote that holds the image and runs the instance (see `incus remote list`).")
    var remote: String?

    @Option(help: "The cluster member to place the instance on.")
    var target: String?

    @Option(help: "A profile to launch with (repeatable; default: debusine, made by `setup`).")
    var profile: [String] = []

    @Flag(
        inversion: .prefixedNo, exclusivity: .chooseLast,
        help:
            "Make a spare instance ahead, which a revert starts (made once the host is quiet; see --eager-spare); --no-spare makes none (a revert then makes its instance from the image, slower on pools that copy images, like dir)."
    )
    var spare = true

    @Flag(
        help:
            "Make the spare as soon as the testbed is up, even while the test keeps the host busy. By default it waits for a quiet moment (a CPU and a half idle for a second: making it takes about that much), so that it does not slow the test; a revert that comes first makes it then. With --remote it is made at once (the remote's load is not visible here)."
    )
    var eagerSpare = false

    @Flag(
        inversion: .prefixedNo, exclusivity: .chooseLast,
        help:
            "Run the testbed's commands through a helper started in each instance over one long-lived `incus exec` (it needs python3 in the image; without it the server says so and goes without); --no-guest-helper runs each command through an `incus exec` of its own (about 55 ms more a command here)."
    )
    var guestHelper = true

    @Option(
        help:
            "Seconds to wait for the instance to boot (systemctl is-system-running), and for each `incus launch`, `init` or `start` to return."
    )
    var bootTimeout = 300

    @Option(help: "Seconds a graceful stop may take before the instance is killed.")
    var stopTimeout = 30

    @Option(help: ArgumentHelp(StatisticsFile.optionHelp, valueName: "path"))
    var statisticsFile: String?

    @Argument(help: "The image alias to launch, e.g. artifact/42.")
    var image: String

    @Argument(
        parsing: .captureForPassthrough,
        help: ArgumentHelp(
            "Extra `incus launch` arguments: everything after the image, with or without `--`.",
            valueName: "launch-args"))
    var launchArguments: [String] = []

    func run() async throws {
        VirtServer.prepareProcess(program: "debusine-virt-incus", debug: debug)
        do {
            let options = try options()
            // What the command line came to, for -d.
            log.debug(
                "instances are made as: \(options.cli.launch(IncusCLI.Launch(image: options.image, name: "NAME", profiles: options.profiles, virtualMachine: options.virtualMachine, target: options.target, extraArguments: options.extraLaunchArguments)))"
            )
            // debusine's names for the two kinds of Incus executor.
            let backend = options.virtualMachine ? "incus-vm" : "incus-lxc"
            let statistics = try statisticsFile.map { (path) throws(VirtError) in
                try StatisticsFile(path: path, backend: backend, image: options.cli.qualified(options.image))
            }
            try await IncusPreflight.check(options)
            await VirtServer.serve(
                IncusTestbed(options: options),
                cleanupAfterDeath: ["gc", "--owner", String(getpid())]
                    + (options.cli.remote.map { ["--remote", $0] } ?? []),
                statistics: statistics)
        } catch {
            VirtServer.failBeforeBanner(error)
        }
    }

    func options() throws(VirtError) -> IncusOptions {
        guard !lxd else {
            throw VirtError(.unavailable, "--lxd is not supported: debusine-virt-incus runs Incus only (--incus)")
        }
        guard !image.contains(":") else {
            throw VirtError(.usage, "give the remote with --remote, not in the image name (\(image))")
        }
        guard bootTimeout > 0, stopTimeout >= 0 else { throw VirtError(.usage, "the timeouts must be positive") }
        var options = IncusOptions(
            image: image, auxverbExecutable: try VirtServer.auxverbExecutable(besides: "debusine-virt-incus"))
        options.cli = IncusCLI(remote: remote.map { $0.hasSuffix(":") ? String($0.dropLast()) : $0 })
        options.spare = spare
        options.eagerSpare = eagerSpare
        options.guestHelper = guestHelper
        options.bootTimeout = .seconds(bootTimeout)
        options.stopTimeout = stopTimeout
        // As autopkgtest-virt-incus reads it (argparse.REMAINDER): the `--` right after the image
        // is not a launch argument.
        let given = launchArguments.first == "--" ? Array(launchArguments.dropFirst()) : launchArguments
        let merged = try LaunchArguments.merge(
            given, profiles: profile.isEmpty ? options.profiles : profile, virtualMachine: vm, target: target)
        options.virtualMachine = merged.virtualMachine
        options.target = merged.target
        options.profiles = merged.profiles
        options.extraLaunchArguments = merged.extraArguments
        return options
    }
}

/// `debusine-virt-incus setup [--check]`.
struct SetupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "setup",
        abstract: "Make this Incus host ready for debusine-virt-incus, and say what changed.",
        discussion: """
            Creates what is missing, and changes nothing that is there: the storage pool, the \
            managed network and the debusine profile (raw.lxc: lxc.mount.auto=sys, \
            security.secureboot=false, nic eth0 named host0 on the network, root disk on the pool).
            """,
        helpNames: .shortAndLong
    )

    @Flag(help: "Only report what is missing; change nothing (exit status 1 when something is).")
    var check = false

    @Option(help: "The Incus remote to set up.")
    var remote: String?

    @Option(help: "The managed network to create.")
    var network = "debusinebr0"

    @Option(help: "ipv4.address of a new network: auto, none (no addresses, no traffic), or ADDRESS/PREFIX.")
    var ipv4Address = "auto"

    @Option(help: "ipv6.address of a new network: auto, none, or ADDRESS/PREFIX.")
    var ipv6Address = "none"

    @Option(help: "The storage pool for the root disks.")
    var pool = "default"

    @Option(help: "The driver of a new storage pool.")
    var poolDriver = "dir"

    @Option(help: "The profile to create.")
    var profile = "debusine"

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    func run() async throws {
        Log.shared.configure(program: "debusine-virt-incus setup", debug: debug)
        var options = IncusSetup.Options()
        options.cli = IncusCLI(remote: remote)
        options.network = network
        options.ipv4Address = ipv4Address
        options.ipv6Address = ipv6Address
        options.pool = pool
        options.poolDriver = poolDriver
        options.profile = profile
        let setup = IncusSetup(options: options)
        do {
            if check {
                let missing = try await setup.missing()
                if missing.isEmpty {
                    Output.line("everything is set up")
                    return
                }
                for requirement in missing { Output.line("missing: \(requirement.description)") }
                Glibc.exit(1)
            }
            let changes = try await setup.apply()
            Output.line(
                changes.isEmpty ? "everything was already set up; nothing changed" : changes.joined(separator: "\n"))
        } catch {
            Output.fail(error)
        }
    }
}

/// `debusine-virt-incus import --artifact-id ID [--vm] FILE`.
struct ImportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Import a debusine system tarball (or, with --vm, system image) as artifact/ID.",
        discussion: """
            Containers: FILE is a root file system tarball (tar, or compressed with xz, gzip, zstd \
            or bzip2). It becomes a unified Incus image with the root file system under rootfs/, \
            systemd-networkd enabled, a systemd generator for containers, hostname and hosts \
            templates. VMs: FILE is a qcow2 image, or a tarball holding one raw image. \
            Importing an alias that exists already changes nothing.
            """,
        helpNames: .shortAndLong
    )

    @Option(help: "The debusine artifact id: the image gets the alias artifact/ID.")
    var artifactId: String

    @Flag(help: "Import a virtual machine image instead of a container tarball.")
    var vm = false

    @Option(help: "The Incus remote to import into.")
    var remote: String?

    @Option(help: "Debian architecture of the image (default: found from its executables; the host's for VMs).")
    var architecture: String?

    @Option(help: "The image description (default: OS, release, architecture and artifact id).")
    var description: String?

    @Option(help: "The SHA-256 digest (hex) a downloaded FILE must have.")
    var sha256: String?

    @Option(help: "The image cache for URLs (default: $DEBUSINE_VIRT_CACHE, else the XDG cache).")
    var cacheDir: String?

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    @Argument(help: "The tarball or image: a path, or an http(s) or file URL downloaded into the image cache.")
    var file: String

    func run() async throws {
        Log.shared.configure(program: "debusine-virt-incus import", debug: debug)
        var options = ImageImport.Options(artifactID: artifactId)
        options.virtualMachine = vm
        options.cli = IncusCLI(remote: remote)
        options.architecture = architecture
        options.description = description
        options.sha256 = sha256
        options.cacheDirectory = cacheDir
        do {
            Output.line(try await ImageImport(options: options).run(file))
        } catch {
            Output.fail(error)
        }
    }
}

/// `debusine-virt-incus gc`.
struct GCCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract:
            "Delete the instances that servers of this host launched and left behind when they died, and the servers' directories in $TMPDIR.",
        helpNames: .shortAndLong
    )

    @Option(help: "The Incus remote to clean.")
    var remote: String?

    @Option(
        help: ArgumentHelp(
            "Only the instances of this server, once it has ended (what a server's death watch runs).",
            visibility: .hidden))
    var owner: Int32?

    @Flag(name: [.short, .long], help: "Log more on stderr.")
    var debug = false

    func run() async throws {
        Log.shared.configure(program: "debusine-virt-incus gc", debug: debug)
        do {
            let collector = IncusGarbageCollector(cli: IncusCLI(remote: remote))
            if let owner {
                _ = LiveProcess.waitForEnd(of: owner, seconds: 60)
                for line in try await collector.collect(owner: owner) {
                    log.warning("the server (pid \(owner)) died without cleaning up: \(line)")
                }
                return
            }
            let report = try await collector.collect()
            Output.line(report.isEmpty ? "nothing to remove" : report.joined(separator: "\n"))
            if report.contains(where: { $0.hasPrefix("could not") }) { Glibc.exit(1) }
        } catch {
            Output.fail(error)
        }
    }
}

/// What the commands other than the server print: results on stdout, errors on stderr.
enum Output {
    static func line(_ text: String) {
        try? writeAll(1, Array((text + "\n").utf8), "cannot write to stdout")
    }

    static func fail(_ error: any Error) -> Never {
        let virtError = error as? VirtError ?? VirtError(.internalError, "\(error)")
        log.error(virtError.message)
        Glibc.exit(ExitStatus.beforeBanner(virtError))
    }
}
