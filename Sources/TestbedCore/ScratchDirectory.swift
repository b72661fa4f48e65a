import VirtCore

/// The scratch directory `open` replies: made in the testbed with `mktemp`, world-writable only
/// when the testbed is isolated from the host (so nothing untrusted shares it).
public enum ScratchDirectory {
    /// The directory's mode for a testbed with `capabilities`.
    public static func mode(_ capabilities: [String]) -> String {
        Capability.isIsolated(capabilities) ? "0777" : "0755"
    }

    /// Makes a new directory in the testbed's temporary directory and returns its path.
    public static func make(in testbed: InTestbed, mode: String) async throws(VirtError) -> String {
        let path = try await testbed.script(
            #"d=$(mktemp --directory --tmpdir autopkgtest.XXXXXX); chmod "$1" "$d"; echo "$d""#, [mode])
        guard isPlausible(path) else {
            throw VirtError(
                .testbedFailure,
                "creating the scratch directory gave \(path.debugDescription), not an absolute path of printable "
                    + "ASCII without spaces or `%`, which the protocol's replies need")
        }
        return path
    }

    /// Whether `path` can be the scratch directory: absolute, printable ASCII without spaces or
    /// `%`. It goes into the `open` and `revert` replies, which sbuild reads raw and autopkgtest
    /// percent-decodes: only such a word reads the same to both (protocol-spec, section 4).
    public static func isPlausible(_ path: String) -> Bool {
        path.utf8.first == UInt8(ascii: "/")
            && path.utf8.allSatisfy { (0x21...0x7E).contains($0) && $0 != UInt8(ascii: "%") }
    }
}
