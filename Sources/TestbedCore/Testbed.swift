import CommandRunner
import VirtCore

/// Capability words of the protocol.
public enum Capability {
    public static let revert = "revert"
    public static let revertFullSystem = "revert-full-system"
    public static let reboot = "reboot"
    public static let rootOnTestbed = "root-on-testbed"
    public static let isolationContainer = "isolation-container"
    public static let isolationMachine = "isolation-machine"

    public static func suggestedNormalUser(_ name: String) -> String { "suggested-normal-user=\(name)" }

    /// Whether the scratch directory may be world-writable: only when the testbed is isolated
    /// from the host, so nothing untrusted shares it.
    public static func isIsolated(_ capabilities: [String]) -> Bool {
        capabilities.contains(isolationContainer) || capabilities.contains(isolationMachine)
    }
}

/// What a backend (QEMU, Incus, the test fixture) implements. The protocol rules, the scratch
/// directory, the reboot sequence and the copy plumbing live in ``TestbedController``; the
/// requirements with default implementations below are hooks a backend may replace with
/// something faster.
public protocol Testbed: Sendable {
    /// The capability words to advertise. Asked before and after `open`.
    func capabilities() async -> [String]

    /// Brings the testbed up and returns the auxverb: the argv prefix that runs a command in it.
    func open() async throws(VirtError) -> [String]

    /// Returns the testbed to its pristine state and returns the auxverb (which may change).
    func revert() async throws(VirtError) -> [String]

    /// What the backend reads from a testbed that has just come up by `open` or `revert` (its
    /// normal user, say), run beside the scratch directory's creation: two commands in the
    /// testbed at once, not one after the other. The reply waits for both. Default: nothing.
    func learn(_ testbed: InTestbed) async

    /// Destroys the testbed and everything made for it. Must be idempotent and safe to call
    /// while any other call is in progress: signal handling calls it at any moment.
    func close() async

    /// Runs before every reboot, `prepare-only` ones included, once the scratch directory is
    /// saved (autopkgtest's `hook_prepare_reboot`). Default: nothing.
    func prepareReboot(_ testbed: InTestbed) async throws(VirtError)

    /// Asks the running testbed to reboot. Default: `systemd-run` a delayed `reboot`, or a
    /// backgrounded `reboot` where systemd does not run.
    func requestReboot(_ testbed: InTestbed) async throws(VirtError)

    /// An id that changes on every boot. Default: the kernel's boot id.
    func bootID(_ testbed: InTestbed) async throws(VirtError) -> String

    /// Waits until the testbed has booted again (its boot id differs from `previousBootID`) and
    /// returns the auxverb to use from now on. `requested` is false for `reboot prepare-only`,
    /// where the test reboots the testbed itself. Default: poll ``bootID(_:)``.
    func waitForReboot(
        _ testbed: InTestbed, previousBootID: String, requested: Bool
    ) async throws(VirtError) -> [String]

    /// How long a reboot may take. Default: 300 s.
    var rebootTimeout: Duration { get }

    /// Where the reboot sequence parks the scratch directory, first writable wins.
    /// Default: /var/cache, then /home (as upstream: /var/cache may be read-only).
    var rebootSaveDirectories: [String] { get }

    /// Copies a file or directory between host and testbed. Default: streams through the
    /// auxverb (``CopyPlumbing``).
    func copy(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError)

    /// Runs an interactive shell on the caller's terminal in `directory`, with `environment`
    /// (`VAR=value` words) exported. Default: `bash -i` through the auxverb on /dev/tty.
    func shell(_ testbed: InTestbed, directory: String, environment: [String]) async throws(VirtError)

    /// Diagnostics for `auxverb_debug_fail`, or nil when there is nothing to add.
    func debugFailureReport() async -> String?

    /// What the testbed has and uses now, for `--statistics-file`; `full` asks for the facts
    /// that do not change too (CPUs, architecture). Runs beside the session's commands, never in
    /// their way. Default: ``ResourceProbe`` through the auxverb.
    func resources(_ testbed: InTestbed, full: Bool) async throws(VirtError) -> ResourceSample
}

extension Testbed {
    public func learn(_ testbed: InTestbed) async {}

    public func prepareReboot(_ testbed: InTestbed) async throws(VirtError) {}

    public func requestReboot(_ testbed: InTestbed) async throws(VirtError) {
        try await RebootRequest.viaSystemd(testbed)
    }

    public func bootID(_ testbed: InTestbed) async throws(VirtError) -> String {
        try await testbed.check(["cat", "/proc/sys/kernel/random/boot_id"])
    }

    public func waitForReboot(
        _ testbed: InTestbed, previousBootID: String, requested: Bool
    ) async throws(VirtError) -> [String] {
        try await RebootSequence.pollForNewBootID(self, testbed, previousBootID: previousBootID)
        return testbed.auxverb
    }

    public var rebootTimeout: Duration { .seconds(300) }

    public var rebootSaveDirectories: [String] { ["/var/cache", "/home"] }

    public func copy(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        try await CopyPlumbing.copy(request, testbed)
    }

    public func shell(_ testbed: InTestbed, directory: String, environment: [String]) async throws(VirtError) {
        try await InteractiveShell.run(testbed, directory: directory, environment: environment)
    }

    public func debugFailureReport() async -> String? { nil }

    public func resources(_ testbed: InTestbed, full: Bool) async throws(VirtError) -> ResourceSample {
        try await ResourceProbe.sample(testbed, full: full)
    }
}

/// The default way to ask a testbed to reboot, for backends that do more around it.
public enum RebootRequest {
    /// `systemd-run` a delayed `reboot`, or a backgrounded `reboot` where systemd does not run.
    public static func viaSystemd(_ testbed: InTestbed) async throws(VirtError) {
        let hasSystemd = (try? await testbed.run(["test", "-d", "/run/systemd/system"]))?.status.succeeded ?? false
        if hasSystemd {
            let result = try await testbed.run([
                "systemd-run", "--no-block", "--quiet", "sh", "-c", "sleep 3; reboot",
            ])
            if result.status.succeeded { return }
            log.debug("systemd-run reboot failed (\(result.status)): \(result.errorText); trying sh")
        }
        try await testbed.check(["sh", "-c", "(sleep 3; reboot) >/dev/null 2>&1 &"])
    }
}
