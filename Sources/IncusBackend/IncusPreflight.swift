import CommandRunner
import VirtCore

/// What the server checks before its banner, so that a host or image that cannot work gives an
/// error that says what to do instead of a failing `open`.
public enum IncusPreflight {
    public static func check(
        _ options: IncusOptions, runner: any CommandRunner = SubprocessRunner()
    )
        async throws(VirtError)
    {
        let cli = options.cli
        let info = cli.imageInfo(options.image)
        let result: CommandResult
        do {
            result = try await runner.run(info)
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
}
