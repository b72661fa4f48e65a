import CommandRunner
import Foundation
import GuestHelper
import ImageCache
import QemuMonitor
import Synchronization
import VirtCore

/// One boot of one VM: its private directory, the QEMU process, the monitor and agent
/// connections and the auxverb relay.
///
/// It is registered with its testbed before anything exists, and every handle is stored as soon
/// as it is made, so ``destroy(graceful:)`` (from `close`, a failed boot or a signal) removes
/// exactly what was created, whenever it runs.
final class QemuInstance: GuestHelperHost {
    let paths: InstancePaths
    let options: QemuOptions
    let runner: any CommandRunner
    let relay: AuxverbRelay
    let helper: GuestHelperSupervisor

    struct Handles {
        var qemu: Task<CommandResult?, Never>?
        var relay: Task<Void, Never>?
        var qmp: QMPClient?
        var qga: QGAClient?
        var destroyed = false
        var portWatch: Task<Void, Never>?
        var consoleWatch: Task<Void, Never>?
        /// A restore failed because of the saved state itself (it did not verify, load or run).
        var savedStateFailed = false
        /// The `--baseimage` block node exists in this QEMU (it outlives the device's unplugging).
        var baseImageNode = false
        /// Where the running QEMU keeps the guest's RAM.
        var memory = GuestMemory.anonymous
    }
    let handles = Mutex(Handles())
    private let qemuEnded = Mutex(false)

    /// Uses `directory` (private, 0700, short for the sockets; it outlives reverts so the
    /// auxverb's socket path stays the same) and writes the owner file into it. The overlay goes
    /// into `overlayDirectory` when given (`--overlay-dir`; private too).
    init(
        options: QemuOptions, runner: any CommandRunner, directory: String, overlayDirectory: String? = nil
    ) throws(VirtError) {
        self.options = options
        self.runner = runner
        paths = InstancePaths(directory: directory, overlayDirectory: overlayDirectory)
        relay = AuxverbRelay(socketPath: paths.auxverb)
        helper = GuestHelperSupervisor(relay: relay)
        try OwnedDirectory.claim(paths.directory)
    }

    var qga: QGAClient? { handles.withLock { $0.qga } }
    var hasEnded: Bool { qemuEnded.withLock { $0 } }
    var isGoingAway: Bool { isDestroyed || hasEnded }
    /// Whether ``destroy(graceful:removeDirectory:)`` ran (a close or a signal stopped a boot).
    var isDestroyed: Bool { handles.withLock { $0.destroyed } }
    /// Whether a failed restore was the saved state's fault, so that the state must go.
    var savedStateFailed: Bool { handles.withLock { $0.savedStateFailed } }

    /// Starts QEMU on a fresh overlay over the image and waits until the guest agent answers
    /// and the guest helper is up. `memory`: anonymous, or a file for ``saveState(into:)`` to copy.
    func boot(kvm: Bool, memory: GuestMemory) async throws(VirtError) {
        let deadline = ContinuousClock.now + options.bootTimeout
        let format = options.imageFormat
        try await runner.check(QemuCommands.createOverlay(base: options.image, format: format, overlay: paths.overlay))
        if options.firmware == .efi { try await runner.check(Command("cp", ["--", options.efiVars, paths.efiVars])) }
        let (_, qga) = try await start(kvm: kvm, memory: memory, incoming: false)
        try await AgentWait(instance: self).run(qga, until: deadline)
        try await helper.start(qga, previousBootID: nil)
    }

    /// Starts QEMU on the overlay and EFI variables already in the directory, connects the
    /// monitor, the agent and the auxverb relay, and watches the helper's port.
    func start(kvm: Bool, memory: GuestMemory, incoming: Bool) async throws(VirtError) -> (QMPClient, QGAClient) {
        let logFD = open(paths.qemuLog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard logFD >= 0 else { throw VirtError(.io, "cannot create \(paths.qemuLog)") }
        let command = QemuCommands.qemu(options, paths, kvm: kvm, memory: memory, incoming: incoming)
        handles.withLock { $0.memory = memory }
        log.debug("starting \(command)")
        let runner = self.runner
        let qemu = Task<CommandResult?, Never> {
            let result = try? await runner.run(
                command, input: .none, output: .fileDescriptor(logFD, closeAfterStart: false),
                error: .fileDescriptor(logFD, closeAfterStart: true))
            self.qemuEnded.withLock { $0 = true }
            await self.reportEnd(result)
            return result
        }
        try store { $0.qemu = qemu }

        let qmp = try await QMPClient.connect(path: paths.qmp, timeout: .seconds(30))
        try store { $0.qmp = qmp }
        // QEMU made its sockets with our umask; the directory is private, the sockets are too.
        for socket in [paths.qmp, paths.qga, paths.helperPort, paths.console] { chmod(socket, 0o600) }
        let portWatch = Task { await self.helper.watchPort(qmp, of: self) }
        try store { $0.portWatch = portWatch }
        let consoleLog = ConsoleLog(path: paths.consoleLog, limit: options.consoleLogLimit, runner: runner)
        let consoleWatch = Task { await consoleLog.keepBounded() }
        do throws(VirtError) {
            try store { $0.consoleWatch = consoleWatch }
        } catch {
            consoleWatch.cancel()
            throw error
        }
        let relay = self.relay
        let helperPort = paths.helperPort
        let relayTask = Task {
            do {
                try await relay.run(guestPortPath: helperPort)
            } catch {
                log.debug("relay ended: \(error)")
            }
        }
        try store { $0.relay = relayTask }
        let qga = try await QGAClient.connect(path: paths.qga, timeout: .seconds(30))
        try store { $0.qga = qga }
        return (qmp, qga)
    }

    /// QEMU ended. Unless the server stopped it, that is news: say so, with the exit status,
    /// and fail the commands in flight naming QEMU.
    private func reportEnd(_ result: CommandResult?) async {
        guard !handles.withLock({ $0.destroyed }) else { return }
        let how = result.map { "\($0.status)" } ?? "unknown status"
        let qemuLog = (try? String(contentsOfFile: paths.qemuLog, encoding: .utf8)) ?? ""
        let detail = qemuLog.isEmpty ? "" : ": \(qemuLog.suffix(500))"
        log.error("QEMU exited unexpectedly (\(how))\(detail)")
        await relay.helperGone("QEMU exited unexpectedly (\(how))")
    }

    /// The helper is about to go away with a reboot the server asked for.
    func expectHelperLoss() { helper.expectLoss() }

    /// Waits until the guest runs a boot with a different id, then starts the helper in it.
    func waitForReboot(previousBootID: String, timeout: Duration) async throws(VirtError) {
        try await helper.waitForReboot(of: self, previousBootID: previousBootID, timeout: timeout)
    }

    /// Stops the VM and removes everything of this instance. Graceful: `guest-shutdown`, then
    /// QMP `quit` after the shutdown timeout, then a kill. Not graceful (revert, failures):
    /// straight to `quit` and kill, since the disk state is thrown away anyway.
    func destroy(graceful: Bool, removeDirectory: Bool) async {
        let current = handles.withLock { state -> Handles in
            state.destroyed = true
            return state
        }
        await relay.helperGone("the testbed is shutting down")
        if let qemu = current.qemu, !hasEnded {
            if graceful, let qga = current.qga {
                do {
                    try await qga.send("guest-shutdown")
                    log.debug("asked the guest to shut down")
                    await waitForEnd(options.shutdownTimeout)
                } catch {
                    log.debug("guest-shutdown failed: \(error)")
                }
            }
            if !hasEnded, let qmp = current.qmp {
                if graceful {
                    log.info(
                        "the guest did not shut down within \(options.shutdownTimeout.formattedSeconds); stopping QEMU")
                }
                _ = try? await qmp.execute("quit", timeout: .seconds(5))
                await waitForEnd(.seconds(5))
            }
            if !hasEnded {
                log.warning("QEMU did not stop, killing it")
                qemu.cancel()
            }
            _ = await qemu.value
        }
        current.portWatch?.cancel()
        current.consoleWatch?.cancel()
        await current.qmp?.close()
        await current.qga?.close()
        current.relay?.cancel()
        _ = await current.relay?.value
        if removeDirectory {
            if let overlayDirectory = paths.overlayDirectory {
                try? FileManager.default.removeItem(atPath: overlayDirectory)
            }
            try? FileManager.default.removeItem(atPath: paths.directory)
        } else {
            // The record of the overlay's directory stays: that directory stays too, for the
            // next boot, and gc must find it if the server dies meanwhile.
            for name in (try? FileManager.default.contentsOfDirectory(atPath: paths.directory)) ?? []
            where name != InstancePaths.overlayRecordName {
                try? FileManager.default.removeItem(atPath: "\(paths.directory)/\(name)")
            }
            if paths.overlayDirectory != nil { unlink(paths.overlay) }
        }
    }

    /// Waits at most `timeout` for QEMU to end, even when the caller was cancelled: a teardown
    /// cut short by a signal still gives the guest its time to shut down.
    func waitForEnd(_ timeout: Duration) async {
        await Task { _ = await Deadline(after: timeout).poll(every: .milliseconds(50)) { self.hasEnded } }.value
    }

    func store(_ update: (inout Handles) -> Void) throws(VirtError) {
        let destroyed = handles.withLock { state -> Bool in
            update(&state)
            return state.destroyed
        }
        if destroyed { throw VirtError(.testbedFailure, "the testbed was shut down while starting") }
    }

    func checkAlive(_ when: String) throws(VirtError) {
        if handles.withLock({ $0.destroyed }) {
            throw VirtError(.testbedFailure, "the testbed was shut down \(when)")
        }
        if hasEnded {
            let qemuLog = (try? String(contentsOfFile: paths.qemuLog, encoding: .utf8)) ?? ""
            throw VirtError(.testbedFailure, "QEMU exited \(when): \(qemuLog.suffix(2000))\(consoleTail())")
        }
    }

    /// The end of the serial console, for error messages.
    func consoleTail(_ count: Int = 4000) -> String {
        let text = ConsoleLog.tail(of: paths.consoleLog, characters: count)
        return text.isEmpty ? "" : "\n--- end of the serial console (\(paths.consoleLog)) ---\n\(text)"
    }

    static func writeFile(_ path: String, _ text: String) throws(VirtError) {
        do {
            try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        } catch {
            throw VirtError(.io, "cannot write \(path): \(error)")
        }
    }
}
