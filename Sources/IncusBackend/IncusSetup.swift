import CommandRunner
import Foundation
import VirtCore

/// `debusine-virt-incus setup`: makes an Incus host ready for the servers, idempotently.
///
/// Each ``Requirement`` can tell whether it is met and how to meet it, so `--check` reports
/// what is missing without changing anything and a second `setup` changes nothing.
public struct IncusSetup: Sendable {
    public struct Options: Sendable {
        public var network = "debusinebr0"
        /// `ipv4.address` of a network this creates: `auto`, `none` or an address/prefix.
        public var ipv4Address = "auto"
        public var ipv6Address = "none"
        public var pool = "default"
        public var poolDriver = "dir"
        public var profile = "debusine"
        public var cli = IncusCLI()

        public init(cli: IncusCLI = IncusCLI()) { self.cli = cli }
    }

    /// One thing the host needs.
    public struct Requirement: Sendable {
        public var description: String
        /// The commands that make it so, run in order.
        public var fix: [Command]
        /// A command that succeeds (and, when `expected` is set, prints it) when it is met.
        public var probe: Command
        public var expected: String?
        /// A line the probe's output must hold (a pool or network `status: Created`, not one
        /// still pending on a cluster's members after a `setup` that was interrupted).
        public var expectedLine: String?
        /// The requirement this one refines (a device's key refines the device): when that one
        /// is missing, fixing it fixes this one too, so it is not reported on its own.
        public var parent: String?
    }

    public let options: Options
    let runner: any CommandRunner

    public init(options: Options, runner: any CommandRunner = SubprocessRunner()) {
        self.options = options
        self.runner = runner
    }

    var cli: IncusCLI { options.cli }

    /// Everything `setup` makes sure of, in the order it does it, on a server that is not
    /// clustered.
    public var requirements: [Requirement] { requirements(members: []) }

    /// Everything `setup` makes sure of on a server whose cluster has `members` (none: not
    /// clustered). A cluster makes a pool or network in two steps: defined on each member with
    /// `--target` (pending), then created with its cluster-wide configuration.
    public func requirements(members: [String]) -> [Requirement] {
        let profile = options.profile
        let network = ["ipv4.address=\(options.ipv4Address)", "ipv6.address=\(options.ipv6Address)"]
        var list: [Requirement] = [
            Requirement(
                description: "storage pool \(options.pool) (\(options.poolDriver))",
                fix: members.map { cli.storageCreate(options.pool, driver: options.poolDriver, target: $0) }
                    + [cli.storageCreate(options.pool, driver: options.poolDriver)],
                probe: cli.storageShow(options.pool), expectedLine: "status: Created"),
            Requirement(
                description:
                    "network \(options.network) (ipv4.address=\(options.ipv4Address), ipv6.address=\(options.ipv6Address))",
                fix: members.map { cli.networkCreate(options.network, [], target: $0) }
                    + [cli.networkCreate(options.network, network)],
                probe: cli.networkShow(options.network), expectedLine: "status: Created"),
            Requirement(
                description: "profile \(profile)", fix: [cli.profileCreate(profile)], probe: cli.profileShow(profile)),
        ]
        for (key, value) in [("raw.lxc", "lxc.mount.auto=sys"), ("security.secureboot", "false")] {
            list.append(
                Requirement(
                    description: "profile \(profile): \(key)=\(value)",
                    fix: [cli.profileSet(profile, key, value)],
                    probe: cli.command(["profile", "get", cli.qualified(profile), key]), expected: value,
                    parent: "profile \(profile)"))
        }
        let devices: [(device: String, type: String, properties: [(String, String)])] = [
            ("eth0", "nic", [("name", "host0"), ("network", options.network)]),
            ("root", "disk", [("path", "/"), ("pool", options.pool)]),
        ]
        for (device, type, properties) in devices {
            let summary = properties.map { "\($0.0)=\($0.1)" }
            list.append(
                Requirement(
                    description: "profile \(profile): device \(device) (\(type) \(summary.joined(separator: " ")))",
                    fix: [cli.profileDeviceAdd(profile, device: device, type: type, summary)],
                    probe: cli.command(["profile", "device", "get", cli.qualified(profile), device, "type"]),
                    expected: type, parent: "profile \(profile)"))
            for (key, value) in properties {
                list.append(
                    Requirement(
                        description: "profile \(profile): device \(device) \(key)=\(value)",
                        fix: [cli.profileDeviceSet(profile, device: device, key, value)],
                        probe: cli.command(["profile", "device", "get", cli.qualified(profile), device, key]),
                        expected: value,
                        parent: "profile \(profile): device \(device) (\(type) \(summary.joined(separator: " ")))"))
            }
        }
        return list
    }

    /// The names of the cluster's members, or none when the server is not clustered.
    public func members() async throws(VirtError) -> [String] {
        let query = cli.clusterMembers()
        let result = try await runner.run(query)
        guard result.status.succeeded else {
            if result.errorText.contains("not clustered") { return [] }
            throw IncusErrors.describe(query, result)
        }
        return Self.memberNames(result.outputText)
    }

    /// The member names of `incus query /1.0/cluster/members` (a JSON list of their URLs).
    static func memberNames(_ json: String) -> [String] {
        guard let data = json.data(using: .utf8),
            let urls = try? JSONDecoder().decode([String].self, from: data)
        else { return [] }
        return urls.compactMap { url in
            guard let name = url.split(separator: "/").last else { return nil }
            return name.removingPercentEncoding ?? String(name)
        }
    }

    /// Whether `requirement` is met. Errors that mean incusd cannot be asked at all are thrown.
    public func isMet(_ requirement: Requirement) async throws(VirtError) -> Bool {
        let result = try await runner.run(requirement.probe)
        if !result.status.succeeded {
            let error = IncusErrors.describe(requirement.probe, result)
            if error.code == .unavailable && !error.message.contains("setup") { throw error }
            return false
        }
        if let line = requirement.expectedLine,
            !result.outputText.split(separator: "\n").contains(where: {
                $0.trimmingCharacters(in: .whitespaces) == line
            })
        {
            return false
        }
        guard let expected = requirement.expected else { return true }
        return result.outputText.trimmingCharacters(in: .whitespaces) == expected
    }

    /// The requirements that are not met.
    public func missing() async throws(VirtError) -> [Requirement] {
        var missing: [Requirement] = []
        var covered: Set<String> = []
        for requirement in requirements(members: try await members()) {
            if let parent = requirement.parent, covered.contains(parent) {
                covered.insert(requirement.description)
                continue
            }
            if !(try await isMet(requirement)) {
                missing.append(requirement)
                covered.insert(requirement.description)
            }
        }
        return missing
    }

    /// Meets every requirement; returns one line per change.
    public func apply() async throws(VirtError) -> [String] {
        var changes: [String] = []
        for requirement in requirements(members: try await members()) where !(try await isMet(requirement)) {
            for command in requirement.fix {
                let result = try await runner.run(command)
                // A member's definition that an interrupted `setup` made already.
                guard result.status.succeeded || result.errorText.contains("already defined on member") else {
                    throw IncusErrors.describe(command, result)
                }
            }
            changes.append("set up \(requirement.description)")
        }
        return changes
    }
}

extension String {
    func trimmingCharacters(in set: Set<Character>) -> String {
        var text = Substring(self)
        while let first = text.first, set.contains(first) { text = text.dropFirst() }
        while let last = text.last, set.contains(last) { text = text.dropLast() }
        return String(text)
    }
}

extension Set where Element == Character {
    static let whitespaces: Set<Character> = [" ", "\t", "\n", "\r"]
}
