import CommandRunner
import Foundation

/// The `incus` commands this backend runs, as argv values.
///
/// Every instance and image name goes through ``qualified(_:)``, so that `--remote R` addresses
/// `R:name` in every command and none can forget it. Nothing here runs anything: unit tests
/// assert the argv.
public struct IncusCLI: Sendable, Equatable {
    /// The client program: `incus`, or a path (tests put a fake one first on PATH instead).
    public var executable: String
    /// The remote that holds images and instances, or nil for the local daemon.
    public var remote: String?

    public init(executable: String = "incus", remote: String? = nil) {
        self.executable = executable
        self.remote = remote
    }

    /// `name` on the configured remote.
    public func qualified(_ name: String) -> String {
        guard let remote else { return name }
        return "\(remote):\(name)"
    }

    /// A command of the client. LC_ALL=C because we read its messages.
    public func command(_ arguments: [String]) -> Command {
        Command(executable, arguments, environment: ["LC_ALL": "C"])
    }

    /// What `open` launches.
    public struct Launch: Sendable, Equatable {
        public var image: String
        public var name: String
        public var profiles: [String]
        public var virtualMachine: Bool
        public var target: String?
        /// `user.*` labels and other instance configuration, in this order.
        public var configuration: [(key: String, value: String)]
        /// Extra `incus launch` arguments from the command line, passed last.
        public var extraArguments: [String]

        public init(
            image: String, name: String, profiles: [String], virtualMachine: Bool = false, target: String? = nil,
            configuration: [(key: String, value: String)] = [], extraArguments: [String] = []
        ) {
            self.image = image
            self.name = name
            self.profiles = profiles
            self.virtualMachine = virtualMachine
            self.target = target
            self.configuration = configuration
            self.extraArguments = extraArguments
        }

        public static func == (lhs: Launch, rhs: Launch) -> Bool {
            lhs.image == rhs.image && lhs.name == rhs.name && lhs.profiles == rhs.profiles
                && lhs.virtualMachine == rhs.virtualMachine && lhs.target == rhs.target
                && lhs.configuration.map(\.key) == rhs.configuration.map(\.key)
                && lhs.configuration.map(\.value) == rhs.configuration.map(\.value)
                && lhs.extraArguments == rhs.extraArguments
        }
    }

    /// `incus launch IMAGE NAME --ephemeral ...`: an instance that is deleted when it stops.
    public func launch(_ launch: Launch) -> Command {
        create("launch", launch)
    }

    /// `incus init IMAGE NAME --ephemeral ...`: the same instance as ``launch(_:)``, made but not
    /// started (a spare for the next revert).
    public func initialise(_ launch: Launch) -> Command {
        create("init", launch)
    }

    /// `incus start NAME`.
    public func start(_ name: String) -> Command {
        command(["start", qualified(name), "--quiet"])
    }

    private func create(_ verb: String, _ launch: Launch) -> Command {
        var arguments = [verb, qualified(launch.image), qualified(launch.name), "--ephemeral", "--quiet"]
        for profile in launch.profiles { arguments += ["--profile", profile] }
        if launch.virtualMachine { arguments.append("--vm") }
        if let target = launch.target { arguments += ["--target", target] }
        for (key, value) in launch.configuration { arguments += ["--config", "\(key)=\(value)"] }
        return command(arguments + launch.extraArguments)
    }

    /// `incus exec NAME -- ARGV` without a terminal, for our own commands and the auxverb.
    public func exec(_ name: String, _ argv: [String]) -> Command {
        command(["exec", "--force-noninteractive", qualified(name), "--"] + argv)
    }

    /// The argv prefix of ``exec(_:_:)``, which the auxverb starts with.
    public func execPrefix(_ name: String) -> [String] { exec(name, []).argv }

    /// `incus exec -t`: an interactive command on a terminal, in `directory`, with `environment`.
    public func interactive(_ name: String, directory: String, environment: [String], _ argv: [String]) -> Command {
        var arguments = ["exec", "--force-interactive", "--cwd", directory]
        for assignment in environment { arguments += ["--env", assignment] }
        return command(arguments + [qualified(name), "--"] + argv)
    }

    /// `incus stop --timeout N`: asks the instance to shut down; never forces.
    public func stop(_ name: String, timeout seconds: Int) -> Command {
        command(["stop", qualified(name), "--timeout", String(seconds)])
    }

    /// `incus stop --force`: kills the instance.
    public func forceStop(_ name: String) -> Command {
        command(["stop", qualified(name), "--force"])
    }

    /// `incus delete --force`: stops (by force) and deletes.
    public func delete(_ name: String) -> Command {
        command(["delete", qualified(name), "--force"])
    }

    /// `incus list NAME --format json`: the instances whose name starts with `prefix`, or all of
    /// them (of the remote) when it is empty.
    public func list(prefix: String = "") -> Command {
        let target = remote.map { "\($0):\(prefix)" } ?? prefix
        return command(["list"] + (target.isEmpty ? [] : [target]) + ["--format", "json"])
    }

    /// `incus info --show-log NAME`: the state and the instance's console/LXC log.
    public func showLog(_ name: String) -> Command {
        command(["info", "--show-log", qualified(name)])
    }

    /// `incus query /1.0/instances/NAME`: the instance as JSON, with its cluster `location`.
    public func instanceInfo(_ name: String) -> Command {
        query("/1.0/instances/" + Self.percentEncoded(name))
    }

    /// `incus config get NAME KEY`.
    public func configGet(_ name: String, _ key: String) -> Command {
        command(["config", "get", qualified(name), key])
    }

    /// `incus image info ALIAS`: succeeds when the image exists.
    public func imageInfo(_ alias: String) -> Command {
        command(["image", "info", qualified(alias)])
    }

    /// `incus query /1.0` on the remote (of one cluster member with `target`): the server's
    /// description, with the architectures it runs.
    public func serverInfo(target: String? = nil) -> Command {
        query("/1.0" + (target.map { "?target=\(Self.percentEncoded($0))" } ?? ""))
    }

    /// `incus query PATH` on the remote.
    private func query(_ path: String) -> Command {
        command(["query", remote.map { "\($0):\(path)" } ?? path])
    }

    /// A name as a URL path segment or query value: all but URL-unreserved characters
    /// percent-encoded.
    private static func percentEncoded(_ text: String) -> String {
        let unreserved = CharacterSet(
            charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")
        return text.addingPercentEncoding(withAllowedCharacters: unreserved) ?? text
    }

    /// `incus image import FILE... --alias ALIAS` into the remote's store: a unified image, or
    /// the metadata tarball and the disk of a split one.
    public func imageImport(_ files: [String], alias: String) -> Command {
        var arguments = ["image", "import"] + files
        if let remote { arguments.append("\(remote):") }
        return command(arguments + ["--alias", alias, "--quiet"])
    }

    /// `incus image delete ALIAS_OR_FINGERPRINT`.
    public func imageDelete(_ image: String) -> Command {
        command(["image", "delete", qualified(image)])
    }

    public func networkShow(_ name: String) -> Command { command(["network", "show", qualified(name)]) }

    /// `incus network create NAME [KEY=VALUE...] [--target MEMBER]`: with a member, the
    /// network's definition on that member of a cluster (pending until created without one).
    public func networkCreate(_ name: String, _ configuration: [String], target: String? = nil) -> Command {
        command(["network", "create", qualified(name)] + configuration + (target.map { ["--target", $0] } ?? []))
    }

    public func storageShow(_ pool: String) -> Command { command(["storage", "show", qualified(pool)]) }

    /// `incus storage create POOL DRIVER [--target MEMBER]`, as ``networkCreate(_:_:target:)``.
    public func storageCreate(_ pool: String, driver: String, target: String? = nil) -> Command {
        command(["storage", "create", qualified(pool), driver] + (target.map { ["--target", $0] } ?? []))
    }

    /// `incus query /1.0/cluster/members`: the members' URLs, or "Server is not clustered".
    public func clusterMembers() -> Command {
        command(["query", remote.map { "\($0):/1.0/cluster/members" } ?? "/1.0/cluster/members"])
    }

    public func profileShow(_ name: String) -> Command { command(["profile", "show", qualified(name)]) }
    public func profileCreate(_ name: String) -> Command { command(["profile", "create", qualified(name)]) }

    /// `incus profile set NAME KEY=VALUE`.
    public func profileSet(_ name: String, _ key: String, _ value: String) -> Command {
        command(["profile", "set", qualified(name), "\(key)=\(value)"])
    }

    /// `incus profile device add NAME DEVICE TYPE KEY=VALUE...`.
    public func profileDeviceAdd(_ name: String, device: String, type: String, _ properties: [String]) -> Command {
        command(["profile", "device", "add", qualified(name), device, type] + properties)
    }

    /// `incus profile device set NAME DEVICE KEY=VALUE`.
    public func profileDeviceSet(_ name: String, device: String, _ key: String, _ value: String) -> Command {
        command(["profile", "device", "set", qualified(name), device, "\(key)=\(value)"])
    }
}
