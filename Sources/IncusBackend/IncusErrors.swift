import CommandRunner
import VirtCore

/// Reading what the `incus` client says when it fails, and turning it into advice.
enum IncusErrors {
    static func isNotFound(_ result: CommandResult) -> Bool {
        let text = result.errorText
        return text.contains("Instance not found") || text.contains("not found") && text.contains("nstance")
    }

    /// The error for a failed `incus` command: what the user can do about it when we know.
    static func describe(_ command: Command, _ result: CommandResult) -> VirtError {
        let text = result.errorText
        if let address = unreachableAddress(text) {
            return VirtError(
                .unavailable,
                "the Incus server at \(address) is not reachable (a remote, or the cluster member that holds the "
                    + "instance, is down or cut off); once it is back, `debusine-virt-incus gc` removes what servers "
                    + "that died left there; `\(command)` said: \(text)")
        }
        if text.contains("Missing event connection with target cluster member")
            || text.contains("Cluster member") && text.contains("offline")
        {
            return VirtError(
                .unavailable,
                "a member of the Incus cluster is not reachable (down or cut off); once it is back, "
                    + "`debusine-virt-incus gc` removes what servers that died left there; `\(command)` said: \(text)")
        }
        if text.contains("doesn't appear to be started") || text.contains("unix.socket: connect: no such file")
            || text.contains("connection refused")
        {
            return VirtError(
                .unavailable,
                "incusd is not running or not reachable (start it: `systemctl start incus`, or scripts/start-incusd "
                    + "without systemd); `\(command)` said: \(text)")
        }
        if text.contains("permission denied") {
            return VirtError(
                .unavailable,
                "no permission to talk to incusd: add yourself to the incus-admin group (`adduser $USER incus-admin`, "
                    + "then log in again); `\(command)` said: \(text)")
        }
        if text.contains("Profile not found") || text.contains("profile") && text.contains("not found")
            || text.contains("Network not found") || text.contains("network") && text.contains("not found")
        {
            return VirtError(
                .unavailable,
                "the Incus host is not set up: run `debusine-virt-incus setup`; `\(command)` said: \(text)")
        }
        return VirtError.failed(command, result)
    }

    /// The `host:port` of the client's "Unable to connect to: ADDRESS (...)": a TLS remote or
    /// cluster member that does not answer. A unix socket is described as incusd not running.
    static func unreachableAddress(_ text: String) -> String? {
        guard let range = text.range(of: "Unable to connect to: ") else { return nil }
        let address = text[range.upperBound...].prefix { $0 != " " && $0 != "\n" && $0 != "(" }
        guard !address.isEmpty, !address.hasPrefix("/"), !address.contains("unix.socket") else { return nil }
        return String(address)
    }

    static func launchFailed(_ command: Command, _ result: CommandResult, image: String) -> VirtError {
        let text = result.errorText
        if text.contains("Image not found") || text.contains("Couldn't find the requested image")
            || text.contains("not found") && text.contains("mage")
        {
            return VirtError(
                .notFound,
                "the image \(image) is not in Incus: import it with `debusine-virt-incus import --artifact-id ID FILE` "
                    + "(incus said: \(text))")
        }
        return describe(command, result)
    }
}
