import CommandRunner
import VirtCore

/// The user that `suggested-normal-user=` advertises: as autopkgtest's own servers choose it,
/// the account with the lowest uid in Debian Policy's range for dynamically allocated users
/// (1000-59999).
public enum NormalUser {
    static let script =
        #"getent passwd | awk -F: '$3 >= 1000 && $3 <= 59999 { print $3 " " $1 }' | sort -n | sed -n '1s/^[0-9]* //p'"#

    /// The command that prints the user's name, or nothing.
    public static let argv = ["/bin/sh", "-c", script]

    /// The user's name from the output of ``argv``, or nil when there is none.
    public static func parse(_ result: CommandResult) -> String? {
        let name = result.outputText
        guard result.status.succeeded, !name.isEmpty, !name.contains(" ") else { return nil }
        return name
    }

    /// Asks the testbed; nil when it has no such user (or cannot tell).
    public static func find(in testbed: InTestbed) async -> String? {
        guard let result = try? await testbed.run(argv) else { return nil }
        return parse(result)
    }
}
