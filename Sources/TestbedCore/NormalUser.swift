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

    /// The user's name from the output of ``argv``, or nil when there is none or it is not a
    /// plain user name.
    ///
    /// The name comes from the testbed's passwd, which a hostile image or a root test writes,
    /// and goes into the `capabilities` reply, which the client splits on any whitespace: a
    /// tab or newline in it would add capability words of the testbed's choosing (say
    /// `downtmp-host=/some/host/dir`, which autopkgtest then writes into). So only names that
    /// Debian's default NAME_REGEX (adduser.conf) allows are advertised, without its `$` for
    /// machine accounts, and at most 32 characters as useradd allows.
    public static func parse(_ result: CommandResult) -> String? {
        let name = result.outputText
        guard result.status.succeeded, isPlainUserName(name) else { return nil }
        return name
    }

    /// `^[a-z][-a-z0-9_]*$`, 1 to 32 characters.
    public static func isPlainUserName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard let first = bytes.first, (1...32).contains(bytes.count),
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(first)
        else { return false }
        return bytes.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
                || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
        }
    }

    /// Asks the testbed; nil when it has no such user (or cannot tell).
    public static func find(in testbed: InTestbed) async -> String? {
        guard let result = try? await testbed.run(argv) else { return nil }
        return parse(result)
    }
}
