import CommandRunner
import Foundation
import VirtCore

/// The user that `suggested-normal-user=` advertises: as autopkgtest's own servers choose it,
/// the account with the lowest uid in Debian Policy's range for dynamically allocated users
/// (1000-59999).
public enum NormalUser {
    /// The command whose output the user is chosen from: one program in the testbed, the
    /// choosing done here, where it is tested against autopkgtest's own pipeline. (Measured on a
    /// state saved mid-boot, the pipeline of getent, awk, sort and sed it replaces took 0.30 s
    /// after a QEMU restore under TCG, getent alone 0.25 s: the first program a restored guest
    /// runs costs the most, whichever; on a settled state getent takes about 0.12 s.)
    public static let argv = ["getent", "passwd"]

    /// The most of the account list read: far more than any local passwd.
    static let outputLimit = 16 << 20

    /// The user's name from the output of ``argv``: the account with the lowest uid in the
    /// range (ties: the whole line first in byte order, as `sort -t: -nk3` in the C locale gives);
    /// nil when there is none or its name is not a plain user name.
    ///
    /// The name comes from the testbed's passwd, which a hostile image or a root test writes,
    /// and goes into the `capabilities` reply, which the client splits on any whitespace: a
    /// tab or newline in it would add capability words of the testbed's choosing (say
    /// `downtmp-host=/some/host/dir`, which autopkgtest then writes into). So only names that
    /// Debian's default NAME_REGEX (adduser.conf) allows are advertised, without its `$` for
    /// machine accounts, and at most 32 characters as useradd allows.
    public static func parse(_ result: CommandResult) -> String? {
        guard result.status.succeeded else { return nil }
        var best: (uid: Int, line: ArraySlice<UInt8>, name: ArraySlice<UInt8>)?
        for line in result.standardOutput.split(separator: UInt8(ascii: "\n")) {
            let fields = line.split(separator: UInt8(ascii: ":"), omittingEmptySubsequences: false)
            // Blanks around the number are read past, as awk and `sort -n` do.
            let number = fields.count >= 3 ? String(decoding: fields[2], as: UTF8.self) : ""
            guard let uid = Int(number.trimmingCharacters(in: .whitespaces)),
                (1000...59999).contains(uid)
            else { continue }
            if let current = best,
                current.uid < uid || (current.uid == uid && !line.lexicographicallyPrecedes(current.line))
            {
                continue
            }
            best = (uid, line, fields[0])
        }
        guard let best else { return nil }
        let name = String(decoding: best.name, as: UTF8.self)
        return isPlainUserName(name) ? name : nil
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
        guard let result = try? await testbed.run(argv, output: .capture(limit: outputLimit)) else { return nil }
        return parse(result)
    }
}
