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
            throw VirtError(.testbedFailure, "creating the scratch directory gave no path: \(path)")
        }
        return path
    }

    /// Whether `path` can be the scratch directory: absolute, one line. It goes into the `open`
    /// reply, which the client reads as one line.
    public static func isPlausible(_ path: String) -> Bool {
        path.hasPrefix("/") && !path.contains("\n") && !path.contains("\r")
    }
}
