import CommandRunner
import Foundation
import VirtCore

/// What the server checks before its banner, so that a host or image that cannot work gives an
/// error that says what to do instead of a failing `open`.
public enum IncusPreflight {
    /// Checks the image, the `--target` member, the image's architecture and the profiles. Each
    /// command is bounded by `--boot-timeout`: an incusd that stopped answering must not hold
    /// the server before its banner, and its client with it, for good.
    public static func check(
        _ options: IncusOptions, runner base: any CommandRunner = SubprocessRunner()
    )
        async throws(VirtError)
    {
        let runner = TimeLimitedRunner(base, limit: options.bootTimeout)
        let cli = options.cli
        let info = cli.imageInfo(options.image)
        let result: CommandResult
        do {
            result = try await runner.run(info)
        } catch let error where error.code == .timeout {
            throw VirtError(.timeout, "\(error.message): is incusd answering?")
        } catch {
            throw VirtError(.unavailable, "cannot run `\(cli.executable)`: apt-get install incus (\(error))")
        }
        if !result.status.succeeded {
            if result.errorText.contains("not found") {
                throw VirtError(
                    .notFound,
                    "the image \(cli.qualified(options.image)) is not in Incus: import it with "
                        + "`debusine-virt-incus import --artifact-id ID FILE`")
            }
            throw IncusErrors.describe(info, result)
        }
        // `@GROUP` names a cluster group, which the member query does not know.
        var member: CommandResult?
        if let target = options.target, !target.hasPrefix("@") {
            member = try await checkTarget(target, options, runner: runner)
        }
        try await checkArchitecture(options, imageInfo: result.outputText, serverInfo: member, runner: runner)
        for profile in options.profiles {
            let show = cli.profileShow(profile)
            let shown = try await runner.run(show)
            if !shown.status.succeeded {
                if shown.errorText.contains("not found") {
                    throw VirtError(
                        .unavailable,
                        "the Incus profile \(cli.qualified(profile)) does not exist: run `debusine-virt-incus setup`")
                }
                throw IncusErrors.describe(show, shown)
            }
        }
    }

    /// A `--target` that is not a member of the server's cluster (or a server that is not
    /// clustered) fails here, before the banner, instead of at `open`. Returns the member's
    /// answer, which the architecture check reads too.
    static func checkTarget(
        _ target: String, _ options: IncusOptions, runner: any CommandRunner
    )
        async throws(VirtError) -> CommandResult
    {
        let query = options.cli.serverInfo(target: target)
        let result = try await runner.run(query)
        guard !result.status.succeeded else { return result }
        let server = options.cli.remote.map { "the Incus remote \($0)" } ?? "the Incus server"
        guard result.errorText.lowercased().contains("member not found") else {
            throw IncusErrors.describe(query, result)
        }
        // incusd says the same of a server that is not clustered at all.
        let members = try await IncusSetup(options: .init(cli: options.cli), runner: runner).members()
        if members.isEmpty {
            throw VirtError(.usage, "--target \(target): \(server) is not clustered; leave --target out")
        }
        throw VirtError(
            .usage,
            "--target \(target): \(server) has no cluster member of that name (its members: "
                + "\(members.joined(separator: ", ")))")
    }

    /// An image of an architecture the Incus server cannot run fails here, naming both, instead
    /// of at `open` with incusd's "Requested architecture isn't supported by this host". The
    /// server is asked only when the image is not of this machine's architecture (or is on a
    /// remote): an amd64 image on an amd64 host costs no command. With `--target` the member is
    /// asked; a cluster asked without one is left to place the instance (its members may differ).
    /// The check only advises: a query that fails or says nothing usable lets `open` find out.
    /// `serverInfo`: the server's (or member's) answer to that query, when ``checkTarget`` asked
    /// it already.
    static func checkArchitecture(
        _ options: IncusOptions, imageInfo: String, serverInfo: CommandResult? = nil, runner: any CommandRunner
    ) async throws(VirtError) {
        guard let image = architecture(imageInfo: imageInfo) else { return }
        if options.cli.remote == nil && image == Host.machine { return }
        var answer = serverInfo
        if answer == nil { answer = try? await runner.run(options.cli.serverInfo(target: options.target)) }
        guard let result = answer, result.status.succeeded,
            let server = serverArchitectures(result.outputText), !server.clustered || options.target != nil,
            !server.architectures.isEmpty, !server.architectures.contains(image)
        else { return }
        func named(_ incus: String) -> String {
            guard let debian = Architecture.debian(machine: incus), debian != incus else { return incus }
            return "\(debian) (\(incus))"
        }
        let remote = options.cli.remote.map { "the Incus remote \($0)" } ?? "the Incus server"
        let member = options.target.map { " (member \($0))" } ?? ""
        throw VirtError(
            .unavailable,
            "the image \(options.cli.qualified(options.image)) is for \(named(image)), which \(remote)\(member) "
                + "cannot run: it runs \(server.architectures.map(named).joined(separator: ", ")); "
                + "use a host of that architecture")
    }

    /// The `Architecture:` line of `incus image info` (Incus's name, e.g. aarch64).
    static func architecture(imageInfo: String) -> String? {
        for line in imageInfo.split(separator: "\n") where line.hasPrefix("Architecture:") {
            let value = line.dropFirst("Architecture:".count).trimmingCharacters(in: .whitespaces)
            return value.isEmpty ? nil : value
        }
        return nil
    }

    /// `environment.architectures` and `environment.server_clustered` of `incus query /1.0`.
    static func serverArchitectures(_ serverInfo: String) -> (architectures: [String], clustered: Bool)? {
        guard let object = try? JSONSerialization.jsonObject(with: Data(serverInfo.utf8)) as? [String: Any],
            let environment = object["environment"] as? [String: Any],
            let architectures = environment["architectures"] as? [String]
        else { return nil }
        return (architectures, environment["server_clustered"] as? Bool ?? false)
    }
}
