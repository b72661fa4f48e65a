import CommandRunner
import Foundation
import ImageCache
import Synchronization
import TestbedCore
import VirtCore

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
    /// The private directory made in `--overlay-dir` for the overlay, kept from open to close.
    private let overlayDirectory = Mutex<String?>(nil)
    /// The account `suggested-normal-user=` names, found at each boot.
    private let normalUser = Mutex<String?>(nil)
    /// The saved state's key and its description, made at the first boot.
    private let stateKey = Mutex<SavedStates?>(nil)

    public init(
        options: QemuOptions, runner: any CommandRunner = SubprocessRunner(), auxverbExecutable: String,
        parent: String = PrivateDirectory.temporaryParent
    ) throws(VirtError) {
        self.options = options
        self.runner = runner
        self.auxverbExecutable = auxverbExecutable
        self.parent = parent
        let host = AutopkgtestQemu.hostArchitecture
        let native = options.architecture.runsUnderKVM(onHost: host)
        switch options.accelerator {
        case .tcg: kvm = false
        case .kvm:
            guard native else {
                throw VirtError(
                    .unavailable, "--accel kvm: KVM on this \(host) host cannot run \(options.architecture) guests")
            }
            guard KVMProbe.usable() else {
                throw VirtError(
                    .unavailable, "--accel kvm: KVM cannot run guests here (no usable /dev/kvm or no vmx/svm)")
            }
            kvm = true
        case .auto:
            kvm = native && KVMProbe.usable()
            if !kvm {
                log.info(
                    native
                        ? "KVM is not usable here; using TCG (slower)"
                        : "guest architecture \(options.architecture), host \(host): using TCG (emulation, slower)")
            }
        }
        // What the command line came to, for -d: the VM as QEMU will be started (INSTANCE stands
        // for the instance directory) and the rest of the settings.
        log.debug("QEMU: \(QemuCommands.qemu(options, InstancePaths(directory: "INSTANCE"), kvm: kvm))")
        log.debug(
            "image \(options.image); extra images \(options.extraImages.map(\.path)); boot timeout "
                + "\(options.bootTimeout.formattedSeconds); reboot timeout \(options.rebootTimeout.formattedSeconds); "
                + "shutdown timeout \(options.shutdownTimeout.formattedSeconds); overlay in "
                + "\(options.overlayParent ?? "the instance directory"); baseimage \(options.baseImage); show boot "
                + "\(options.showBoot); console user \(options.consoleUser ?? "root"); normal user "
                + "\(options.normalUser ?? "found in the guest")")
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
        if let old = current.withLock({ $0 }) {
            log.debug("reverting: stopping the VM")
            await old.destroy(graceful: false, removeDirectory: false)
            log.debug("reverting: the VM has stopped")
        }
        try await boot()
        return auxverb
    }

    public func close() async {
        let instance = current.withLock { value -> QemuInstance? in
            defer { value = nil }
            return value
        }
        await instance?.destroy(graceful: true, removeDirectory: true)
        // A shutdown while the directories existed but before an instance did.
        if let path = overlayDirectory.withLock({ value -> String? in
            defer { value = nil }
            return value
        }) {
            try? FileManager.default.removeItem(atPath: path)
        }
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
        return try await GuestHelperSupervisor.bootID(qga)
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
        let echo = options.showBoot ? ConsoleEcho.start(path: instance.paths.consoleLog) : nil
        defer { echo?.stop() }
        // A little under the reboot sequence's own limit (``rebootTimeout``), so that this error,
        // which carries the serial console's end, is the one reported.
        try await instance.waitForReboot(previousBootID: previousBootID, timeout: options.rebootTimeout)
        if options.baseImage { try await plugBaseImage(instance) }
        return auxverb
    }

    /// `--timeout-reboot`, and a little more for the reboot sequence around the wait.
    public var rebootTimeout: Duration { options.rebootTimeout + .seconds(15) }

    /// The base image is unplugged before any reboot, as autopkgtest-virt-qemu does: a boot
    /// that sees its partitions (same UUIDs as the boot disk's) may mount the wrong one.
    public func prepareReboot(_ testbed: InTestbed) async throws(VirtError) {
        guard options.baseImage, let instance = current.withLock({ $0 }) else { return }
        await instance.unplugBaseImage()
    }

    /// Plugs the base image in and waits for /dev/baseimage in the guest.
    private func plugBaseImage(_ instance: QemuInstance) async throws(VirtError) {
        let testbed = InTestbed(auxverb: auxverb, runner: runner)
        try await testbed.script(BaseImage.rulesScript, [BaseImage.udevRules])
        try await instance.plugBaseImage()
        guard (try? await testbed.script(BaseImage.waitScript)) != nil else {
            throw VirtError(.testbedFailure, "--baseimage: /dev/baseimage did not appear in the guest within 30 s")
        }
    }

    /// An interactive shell on a pseudo-terminal in the guest, wired to the caller's terminal
    /// (put in raw mode meanwhile, so keys like ^C and ^Z reach the guest's shell).
    public func shell(_ testbed: InTestbed, directory: String, environment: [String]) async throws(VirtError) {
        let tty = Glibc.open("/dev/tty", O_RDWR | O_CLOEXEC)
        guard tty >= 0 else {
            log.error("cannot run a shell: /dev/tty: \(VirtError.text(errno: errno))")
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

    var instancePaths: InstancePaths {
        InstancePaths(directory: directory.withLock { $0 } ?? "", overlayDirectory: overlayDirectory.withLock { $0 })
    }

    public func debugFailureReport() async -> String? {
        current.withLock { $0 }?.consoleTail()
    }

    /// The guest's own reading (``ResourceProbe``, through the helper), and what its overlay
    /// takes on the host's disk.
    public func resources(_ testbed: InTestbed, full: Bool) async throws(VirtError) -> ResourceSample {
        var sample = try await ResourceProbe.sample(testbed, full: full)
        var info = stat()
        if lstat(instancePaths.overlay, &info) == 0 {
            sample.hostDiskSpace = UInt64(max(info.st_blocks, 0)) * 512
        }
        return sample
    }

    var auxverb: [String] {
        [auxverbExecutable, instancePaths.auxverb]
    }

    /// Single files leave the guest through the helper itself (`--read-file`), spliced from its
    /// page cache to the port, rather than through `cat` and a pipe.
    public func copy(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        let reader = [auxverbExecutable, "--read-file", instancePaths.auxverb]
        try await CopyPlumbing.copy(request, testbed.readingFiles(with: reader))
    }

    private func boot() async throws(VirtError) {
        let path: String
        if let existing = directory.withLock({ $0 }) {
            path = existing
        } else {
            path = try PrivateDirectory.make(in: parent, prefix: "dvq.")
            directory.withLock { $0 = path }
            try makeOverlayDirectory(recordedIn: InstancePaths(directory: path))
        }
        let overlayPath = overlayDirectory.withLock { $0 }
        let echo = options.showBoot ? ConsoleEcho.start(path: InstancePaths(directory: path).consoleLog) : nil
        defer { echo?.stop() }
        let saved = await savedStates()
        if let saved, let entry = await saved.store.lookup(saved.key) {
            let started = ContinuousClock.now
            log.info("restoring the saved VM state \(entry.path)")
            let store = saved.store
            let verification = Task<VirtError?, Never> {
                do throws(VirtError) {
                    try await store.verify(entry)
                    return nil
                } catch {
                    return error
                }
            }
            let instance = try QemuInstance(
                options: options, runner: runner, directory: path, overlayDirectory: overlayPath)
            current.withLock { $0 = instance }
            do {
                let status = try await instance.restore(kvm: kvm, from: entry, verification: verification)
                log.info(
                    "restored the saved VM state in \((ContinuousClock.now - started).formattedSeconds) (\(status))")
                try await ready(instance)
                return
            } catch {
                current.withLock { if $0 === instance { $0 = nil } }
                // A close or a signal stopped the restore: there is nothing to boot for.
                let stopped = instance.isDestroyed || Task.isCancelled
                await instance.destroy(graceful: false, removeDirectory: orphaned(path))
                if stopped {
                    verification.cancel()
                    throw error
                }
                // Whatever failed, a boot may still work. The state goes only when it is to blame:
                // its files do not match (which the verification, left to finish, says even when
                // something else failed first), or it did not load or run.
                let verdict = await withTaskCancellationHandler {
                    await verification.value
                } onCancel: {
                    verification.cancel()
                }
                if Task.isCancelled { throw error }
                if instance.savedStateFailed || verdict != nil {
                    log.warning(
                        "cannot restore the saved state \(entry.path), removing it and booting: "
                            + "\((verdict ?? error).message)")
                    await store.discard(entry, corrupt: verdict != nil)
                } else {
                    log.warning("cannot restore the saved state \(entry.path), booting: \(error.message)")
                }
                if orphaned(path) { throw VirtError(.testbedFailure, "the testbed was closed while it was restored") }
            }
        }
        let instance = try QemuInstance(
            options: options, runner: runner, directory: path, overlayDirectory: overlayPath)
        current.withLock { $0 = instance }
        do {
            let memory = saved.map { SavedStateKey.memory(qemuVersion: $0.qemuVersion, instance.paths) } ?? .anonymous
            try await instance.boot(kvm: kvm, memory: memory)
            if let saved { try await save(instance, saved.store, key: saved.key, description: saved.description) }
            try await ready(instance)
        } catch {
            log.debug("boot failed, cleaning up: \(error)")
            current.withLock { if $0 === instance { $0 = nil } }
            await instance.destroy(graceful: false, removeDirectory: orphaned(path))
            throw error
        }
    }

    /// Whether a close took the directory while a boot in it went on: its removal could have
    /// raced with the boot's files, so the failed boot removes the directory itself.
    private func orphaned(_ path: String) -> Bool {
        directory.withLock { $0 != path }
    }

    /// What is left once the guest runs: plugging in the base image.
    private func ready(_ instance: QemuInstance) async throws(VirtError) {
        if options.baseImage { try await plugBaseImage(instance) }
    }

    /// The guest's normal user (the `--user` given, if not root), found while the controller
    /// makes the scratch directory.
    public func learn(_ testbed: InTestbed) async {
        var user = options.normalUser
        if user == nil { user = await NormalUser.find(in: testbed) }
        // Cancelled: the open or revert failed, and its probe with it; the last answer stays.
        guard !Task.isCancelled else { return }
        normalUser.withLock { [user] in $0 = user }
    }

    /// `--overlay-dir`: a private directory (0700) in it for the overlay, named in the instance
    /// directory for `gc`, which looks only in $TMPDIR.
    private func makeOverlayDirectory(recordedIn paths: InstancePaths) throws(VirtError) {
        guard let parent = options.overlayParent else { return }
        let made = try PrivateDirectory.make(in: parent, prefix: InstancePaths.overlayDirectoryPrefix)
        overlayDirectory.withLock { $0 = made }
        do {
            try QemuInstance.writeFile(paths.overlayRecord, made + "\n")
        } catch {
            // A close took the instance directory meanwhile: nothing would remove this one.
            overlayDirectory.withLock { if $0 == made { $0 = nil } }
            try? FileManager.default.removeItem(atPath: made)
            throw error
        }
    }

    /// Saves the freshly booted VM for later opens and reverts, unless another server is saving
    /// the same state already. A state that cannot be saved is only a warning.
    private func save(
        _ instance: QemuInstance, _ store: StateStore, key: String, description: String
    ) async throws(VirtError) {
        let started = ContinuousClock.now
        let builder: StateStore.Builder
        do throws(VirtError) {
            guard let made = try store.beginSaving(key) else {
                log.debug("another server saves the state \(key)")
                return
            }
            builder = made
        } catch {
            log.warning("cannot save the VM state: \(error.message)")
            return
        }
        guard await settle(instance) else {
            builder.abandon()
            return
        }
        log.info("saving the booted VM for later opens and reverts")
        do throws(VirtError) {
            try QemuInstance.writeFile("\(builder.path)/\(SavedStateKey.descriptionFile)", description)
        } catch {
            log.warning("cannot save the VM state: \(error.message)")
            builder.abandon()
            return
        }
        if let problem = try await instance.saveState(into: builder) {
            log.warning("cannot save the VM state: \(problem.message)")
            builder.abandon()
            return
        }
        do throws(VirtError) {
            try await builder.commit()
            log.info(
                "saved the VM state in \(store.directory)/\(key) (\((ContinuousClock.now - started).formattedSeconds))")
        } catch {
            log.warning("cannot save the VM state: \(error.message)")
            builder.abandon()
        }
    }

    /// Lets the guest finish booting before it is saved, and has it read what the server runs
    /// at every open and revert. The guest helper is up before systemd has reached its target and
    /// before udev has loaded the modules of every device; saved then, every guest restored from
    /// the state did that work again while its test ran (on a busy host: the kvm and powernow-k8
    /// modules, the last units), and read getent, mktemp, chmod and install from its disk.
    /// Bounded: systemd's start-up and udev's queue get 20 s each (a start-up that does not end
    /// is saved as it is), a guest that does not answer 60 s, and is not saved.
    /// Returns whether to save.
    private func settle(_ instance: QemuInstance) async -> Bool {
        let started = ContinuousClock.now
        let testbed = InTestbed(auxverb: auxverb, runner: runner)
        do throws(VirtError) {
            let result = try await withTimeout(.seconds(60), "waiting for the guest to settle") {
                try await testbed.run(["/bin/sh", "-c", Self.settleScript], output: .discard, error: .discard)
            }
            let took = (ContinuousClock.now - started).formattedSeconds
            if result.status == .exited(Self.startUpUnfinished) {
                log.info("the guest's start-up had not finished after 20 s; saving it as it is")
            } else {
                log.debug("the guest settled in \(took) (\(result.status))")
            }
        } catch {
            if !instance.isGoingAway {
                log.warning("the guest did not settle before its state was saved (\(error.message)): not saving it")
            }
            return false
        }
        return !instance.isGoingAway
    }

    /// What ``settleScript`` exits with when systemd's start-up did not end in time.
    static let startUpUnfinished: Int32 = 3

    /// Waits for systemd's start-up (where systemd runs) and for udev's queue of events, then
    /// runs what ``learn(_:)`` and the scratch directory run at each open and revert.
    static let settleScript = """
        late=
        if [ -d /run/systemd/system ] && command -v timeout >/dev/null 2>&1; then
            timeout 20 systemctl is-system-running --wait >/dev/null 2>&1
            [ $? -ne 124 ] || late=1
        fi
        if command -v udevadm >/dev/null 2>&1; then udevadm settle --timeout=20 >/dev/null 2>&1; fi
        getent passwd >/dev/null 2>&1
        mktemp --version >/dev/null 2>&1
        install --version >/dev/null 2>&1
        chmod --version >/dev/null 2>&1
        [ -z "$late" ] || exit \(startUpUnfinished)
        exit 0
        """

    /// The state store, this VM's key in it and QEMU's version; nil with `--no-snapshot`, or when
    /// the key cannot be made (then every open boots).
    private func savedStates() async -> SavedStates? {
        guard let cache = options.stateCache else { return nil }
        if let known = stateKey.withLock({ $0 }) { return known }
        do throws(VirtError) {
            let version = try await SavedStateKey.qemuVersion(options.qemu, runner: runner)
            let description = SavedStateKey.description(options: options, kvm: kvm, qemuVersion: version)
            let saved = SavedStates(
                store: StateStore(cacheDirectory: cache, runner: runner), key: StateStore.key(for: description),
                description: description, qemuVersion: version)
            stateKey.withLock { $0 = saved }
            return saved
        } catch {
            log.warning("booting without a saved state: \(error.message)")
            return nil
        }
    }
}

/// Where this server's VM states are saved and under which key.
struct SavedStates: Sendable {
    let store: StateStore
    let key: String
    let description: String
    /// The first line of `qemu --version`, which decides how the RAM is saved.
    let qemuVersion: String
}
