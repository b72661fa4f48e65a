import CommandRunner
import Foundation
import Synchronization
import TestbedCore
import VirtCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The QEMU backend: a VM from a system image, on a fresh qcow2 overlay per boot.
public final class QemuTestbed: Testbed {
    let options: QemuOptions
    let runner: any CommandRunner
    let kvm: Bool
    /// The auxverb's program, debusine-virt-auxverb.
    let auxverbExecutable: String
    let parent: String
    private let current = Mutex<QemuInstance?>(nil)
    /// The private directory of this server's VM, kept from open to close.
    private let directory = Mutex<String?>(nil)
    /// The account `suggested-normal-user=` names, found at each boot.
    private let normalUser = Mutex<String?>(nil)

    public init(
        options: QemuOptions, runner: any CommandRunner = SubprocessRunner(), auxverbExecutable: String,
        parent: String = PrivateDirectory.temporaryParent
    ) throws(VirtError) {
        self.options = options
        self.runner = runner
        self.auxverbExecutable = auxverbExecutable
        self.parent = parent
        switch options.accelerator {
        case .tcg: kvm = false
        case .kvm:
            guard KVMProbe.usable() else {
                throw VirtError(
                    .unavailable, "--accel kvm: KVM cannot run guests here (no usable /dev/kvm or no vmx/svm)")
            }
            kvm = true
        case .auto:
            kvm = KVMProbe.usable()
            if !kvm { log.info("KVM is not usable here; using TCG (slower)") }
        }
    }

    public func capabilities() async -> [String] {
        [
            Capability.revert, Capability.revertFullSystem, Capability.reboot, Capability.rootOnTestbed,
            Capability.isolationMachine,
        ] + (normalUser.withLock { $0 }.map { [Capability.suggestedNormalUser($0)] } ?? [])
    }

    public func open() async throws(VirtError) -> [String] {
        try await boot()
        return auxverb
    }

    public func revert() async throws(VirtError) -> [String] {
        if let old = current.withLock({ $0 }) { await old.destroy(graceful: false, removeDirectory: false) }
        try await boot()
        return auxverb
    }

    public func close() async {
        let instance = current.withLock { value -> QemuInstance? in
            defer { value = nil }
            return value
        }
        await instance?.destroy(graceful: true, removeDirectory: true)
        // A shutdown while the directory existed but before an instance did.
        if let path = directory.withLock({ value -> String? in
            defer { value = nil }
            return value
        }) {
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    /// Through the helper when it is up (a test may have stopped the agent), else the agent.
    public func bootID(_ testbed: InTestbed) async throws(VirtError) -> String {
        guard let instance = current.withLock({ $0 }), let qga = instance.qga else {
            throw VirtError(.testbedFailure, "the testbed is not running")
        }
        if let id = try? await testbed.check(["cat", "/proc/sys/kernel/random/boot_id"]), !id.isEmpty {
            return id
        }
        return try await instance.bootID(qga)
    }

    public func requestReboot(_ testbed: InTestbed) async throws(VirtError) {
        current.withLock { $0 }?.expectHelperLoss()
        try await RebootRequest.viaSystemd(testbed)
    }

    public func waitForReboot(
        _ testbed: InTestbed, previousBootID: String, requested: Bool
    ) async throws(VirtError) -> [String] {
        guard let instance = current.withLock({ $0 }) else {
            throw VirtError(.testbedFailure, "the testbed is not running")
        }
        // A little under the reboot sequence's own limit, so that this error, which carries the
        // serial console's end, is the one reported.
        try await instance.waitForReboot(previousBootID: previousBootID, timeout: rebootTimeout - .seconds(15))
        return auxverb
    }

    /// An interactive shell on a pseudo-terminal in the guest, wired to the caller's terminal
    /// (put in raw mode meanwhile, so keys like ^C and ^Z reach the guest's shell).
    public func shell(_ testbed: InTestbed, directory: String, environment: [String]) async throws(VirtError) {
        let tty = Glibc.open("/dev/tty", O_RDWR | O_CLOEXEC)
        guard tty >= 0 else {
            log.error("cannot run a shell: /dev/tty: \(String(cString: strerror(errno)))")
            return
        }
        defer { Glibc.close(tty) }
        var saved = termios()
        guard tcgetattr(tty, &saved) == 0 else {
            // Not a terminal after all: the plain shell through the auxverb still works.
            try await InteractiveShell.run(testbed, directory: directory, environment: environment)
            return
        }
        let size = try? await runner.run(
            Command("stty", ["size"]), input: .fileDescriptor(tty, closeAfterStart: false), output: .capture,
            error: .discard)
        let words = size?.outputText.split(separator: " ").compactMap { Int($0) } ?? []
        let dimensions = words.count == 2 ? "\(words[0])x\(words[1])" : "24x80"
        var assignments = environment
        if let term = getenv("TERM") { assignments.append("TERM=\(String(cString: term))") }
        var raw = saved
        cfmakeraw(&raw)
        tcsetattr(tty, TCSANOW, &raw)
        defer { tcsetattr(tty, TCSANOW, &saved) }
        let socket = instancePaths.auxverb
        let result = try await runner.run(
            Command(
                auxverbExecutable,
                ["--terminal", dimensions, socket, "sh", "-c", InteractiveShell.script, "sh", directory] + assignments),
            input: .fileDescriptor(tty, closeAfterStart: false),
            output: .fileDescriptor(tty, closeAfterStart: false),
            error: .fileDescriptor(tty, closeAfterStart: false))
        log.debug("shell ended with \(result.status)")
    }

    var instancePaths: InstancePaths { InstancePaths(directory: directory.withLock { $0 } ?? "") }

    public func debugFailureReport() async -> String? {
        current.withLock { $0 }?.consoleTail()
    }

    var auxverb: [String] {
        [auxverbExecutable, instancePaths.auxverb]
    }

    private func boot() async throws(VirtError) {
        let path: String
        if let existing = directory.withLock({ $0 }) {
            path = existing
        } else {
            path = try PrivateDirectory.make(in: parent, prefix: "dvq.")
            directory.withLock { $0 = path }
        }
        let instance = try QemuInstance(options: options, runner: runner, directory: path)
        current.withLock { $0 = instance }
        do {
            try await instance.boot(kvm: kvm)
            let user = await NormalUser.find(in: InTestbed(auxverb: auxverb, runner: runner))
            normalUser.withLock { $0 = user }
        } catch {
            log.debug("boot failed, cleaning up: \(error)")
            current.withLock { if $0 === instance { $0 = nil } }
            await instance.destroy(graceful: false, removeDirectory: false)
            throw error
        }
    }
}
