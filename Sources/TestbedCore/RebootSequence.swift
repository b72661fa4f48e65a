import CommandRunner
import VirtCore

/// The server side of `reboot`, as autopkgtest's clients expect it: park the scratch directory
/// in the testbed, let the testbed reboot, check it really did (new boot id), bring the scratch
/// directory back.
public enum RebootSequence {
    /// Tars the scratch directory ($1) into the first writable directory of the rest, then drops
    /// the prepare mark, which is what lets a `reboot-prepare` test go on to reboot.
    static let saveScript = """
        scratch=$1; shift
        for dir do
            if [ -w "$dir" ]; then
                tar --warning=none --create --absolute-names -f "$dir/autopkgtest-tmpdir.tar" "$scratch"
                rm -f /run/autopkgtest-reboot-prepare-mark
                exit 0
            fi
        done
        echo "no writable directory to save $scratch in: $*" >&2
        exit 1
        """

    static let restoreScript = """
        for dir do
            if [ -e "$dir/autopkgtest-tmpdir.tar" ]; then
                tar --warning=none --extract --absolute-names -f "$dir/autopkgtest-tmpdir.tar"
                rm -f "$dir/autopkgtest-tmpdir.tar"
                exit 0
            fi
        done
        echo "the saved scratch directory is gone from: $*" >&2
        exit 1
        """

    /// Runs the whole sequence and returns the auxverb to use afterwards.
    public static func run(
        _ backend: some Testbed,
        _ testbed: InTestbed,
        scratch: String,
        prepareOnly: Bool,
        copyTimeout: Duration
    ) async throws(VirtError) -> [String] {
        // Read before the save: once the mark is gone a prepare-only test may reboot at once.
        let previous = try await backend.bootID(testbed)
        let saveDirectories = backend.rebootSaveDirectories
        try await withTimeout(copyTimeout, "saving the scratch directory before reboot") {
            try await testbed.script(saveScript, [scratch] + saveDirectories)
        }
        try await backend.prepareReboot(testbed)
        if prepareOnly {
            log.info("state saved, waiting for the testbed to reboot...")
        } else {
            try await backend.requestReboot(testbed)
        }
        let auxverb = try await withTimeout(backend.rebootTimeout, "waiting for the testbed to reboot") {
            try await backend.waitForReboot(testbed, previousBootID: previous, requested: !prepareOnly)
        }
        let rebooted = InTestbed(auxverb: auxverb, runner: testbed.runner)
        try await withTimeout(copyTimeout, "restoring the scratch directory after reboot") {
            try await rebooted.script(restoreScript, saveDirectories)
        }
        return auxverb
    }

    /// Polls the boot id once a second until it differs from `previousBootID`. Failures while
    /// polling are expected (the testbed is down) and only logged.
    public static func pollForNewBootID(
        _ backend: some Testbed, _ testbed: InTestbed, previousBootID: String
    ) async throws(VirtError) {
        let back = await Deadline.none.poll(every: .seconds(1)) { () async -> Bool in
            do {
                let current = try await withTimeout(.seconds(30), "reading the boot id") {
                    try await backend.bootID(testbed)
                }
                guard !current.isEmpty && current != previousBootID else { return false }
                log.debug("testbed is back with boot id \(current)")
                return true
            } catch {
                log.debug("testbed not back yet: \(error)")
                return false
            }
        }
        guard back else { throw VirtError(.timeout, "waiting for the testbed to reboot was cancelled") }
    }
}
