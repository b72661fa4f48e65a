import CommandRunner
import Foundation
import VirtCore

/// `debusine-virt-incus gc`: deletes the instances whose server died (and the relay directories
/// such servers left in $TMPDIR).
///
/// An instance is collected when its labels name this host (and this machine id, when it has
/// one) and its owner process is gone (or is another process under a recycled pid). Instances
/// of other machines, of live processes that /proc hides, and without our labels are never
/// touched.
public struct IncusGarbageCollector: Sendable {
    public let cli: IncusCLI
    let runner: any CommandRunner
    /// This machine, as owners name it (its pid and start time are not used).
    let machine: InstanceOwner
    /// How long the tries at deleting one instance take at most, in all.
    let patience: Duration

    public init(
        cli: IncusCLI = IncusCLI(), runner: any CommandRunner = SubprocessRunner(), host: String? = nil,
        patience: Duration = commandLimit
    ) {
        self.cli = cli
        self.runner = runner
        self.patience = patience
        let current = InstanceOwner.current()
        machine = InstanceOwner(
            host: host ?? current.host, machineID: current.machineID, pid: 0, startTime: "")
    }

    /// The instances on the remote that belong to dead servers of this host. `provenMachine`
    /// takes only owners labelled with this machine's id (not a host name alone, which two
    /// machines or containers may share): for sweeps no one asked for.
    public func orphans(
        owner only: Int32? = nil, provenMachine: Bool = false
    ) async throws(VirtError) -> [(name: String, owner: InstanceOwner)] {
        let command = cli.list(prefix: InstanceName.prefix)
        let result = try await bounded(command)
        guard result.status.succeeded else { throw IncusErrors.describe(command, result) }
        return try Self.parse(result.standardOutput).compactMap { name, configuration in
            guard name.hasPrefix(InstanceName.prefix), let owner = InstanceOwner(configuration: configuration),
                owner.isOnSameMachine(as: machine), only == nil || owner.pid == only,
                !provenMachine || (!machine.machineID.isEmpty && owner.machineID == machine.machineID),
                !owner.isAlive
            else { return nil }
            return (name, owner)
        }
    }

    /// Deletes the orphans, and removes the directories of the guest helper's relay that dead
    /// servers left in $TMPDIR; returns one line per instance and directory.
    /// With `owner`, only that server's (the death watch's run, once it has died). The relay
    /// directories are looked for in `relayParent`.
    public func collect(
        owner only: Int32? = nil, provenMachine: Bool = false, relayParent: String = PrivateDirectory.temporaryParent
    ) async throws(VirtError) -> [String] {
        // Local, so first: a remote that cannot be listed does not keep them.
        var report = HelperChannel.collectOrphans(parent: relayParent, owner: only)
        let orphans: [(name: String, owner: InstanceOwner)]
        do throws(VirtError) {
            orphans = try await self.orphans(owner: only, provenMachine: provenMachine)
        } catch {
            // What was removed is still said.
            for line in report { log.info("gc, before incus failed: \(line)") }
            throw error
        }
        for (name, owner) in orphans where !Task.isCancelled {
            let command = cli.delete(name)
            // A server killed while making an instance leaves incusd making it, and another gc
            // (a server's death watch, an admin's) may be deleting it too: incusd refuses the
            // delete meanwhile, in words that vary. Try again while the instance is there. A
            // command that fails or times out is one more try: the next orphans are not given up.
            var failure = "cancelled"
            var lastRefusal: CommandResult?
            var tried = false
            let deadline = Deadline(after: patience)
            let gone = await deadline.poll(every: .seconds(1)) { () async -> Bool in
                // The poll's last call comes at the deadline: a command given what is left then
                // would time out at once, and its message would hide incusd's last refusal.
                guard !tried || deadline.remaining() >= Self.shortestTry else { return false }
                tried = true
                do throws(VirtError) {
                    if let last = lastRefusal, !last.errorText.contains("is busy running"),
                        try await !exists(name, within: deadline.remaining())
                    {
                        return true
                    }
                    let attempt = try await bounded(command, within: deadline.remaining())
                    lastRefusal = attempt
                    failure = attempt.errorText
                    return attempt.status.succeeded || IncusErrors.isNotFound(attempt)
                } catch {
                    failure = error.message
                    return false
                }
            }
            if gone {
                report.append("deleted instance \(cli.qualified(name)) (its server, pid \(owner.pid), is gone)")
            } else {
                report.append("could not delete instance \(cli.qualified(name)): \(failure)")
            }
        }
        return report
    }

    /// How long one `incus` command may take, and by default all the tries at deleting one
    /// instance: a death watch must not wait for good on an incusd that stopped answering.
    public static let commandLimit: Duration = .seconds(120)

    /// Less time than this left of ``patience``, a delete is not tried again.
    static let shortestTry: Duration = .seconds(2)

    /// Whether an instance named exactly `name` is on the remote.
    func exists(_ name: String, within limit: Duration) async throws(VirtError) -> Bool {
        let command = cli.list(prefix: name)
        let result = try await bounded(command, within: limit)
        guard result.status.succeeded else { throw IncusErrors.describe(command, result) }
        return try Self.parse(result.standardOutput).contains { $0.0 == name }
    }

    /// Runs `command` for at most `limit` (two minutes): a death watch must not wait for good
    /// on an incusd that stopped answering.
    private func bounded(
        _ command: Command, within limit: Duration = commandLimit
    ) async throws(VirtError)
        -> CommandResult
    {
        try await TimeLimitedRunner(runner, limit: limit).run(
            command, input: .none, output: .capture(limit: 64 << 20), error: .capture)
    }

    /// Names and `config` maps from `incus list --format json`.
    static func parse(_ json: [UInt8]) throws(VirtError) -> [(String, [String: String])] {
        let value: Any
        do {
            value = try JSONSerialization.jsonObject(with: Data(json))
        } catch {
            throw VirtError(.commandFailed, "cannot read the instance list of incus: \(error)")
        }
        guard let instances = value as? [[String: Any]] else {
            throw VirtError(.commandFailed, "the instance list of incus is not a list")
        }
        return instances.compactMap { instance in
            guard let name = instance["name"] as? String else { return nil }
            let configuration = (instance["config"] as? [String: Any] ?? [:]).compactMapValues { $0 as? String }
            return (name, configuration)
        }
    }
}
