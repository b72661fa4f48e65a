import CommandRunner
import Foundation
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
final class QemuInstance: Sendable {
    let paths: InstancePaths
    let options: QemuOptions
    let runner: any CommandRunner
    let relay: AuxverbRelay

    struct Handles {
        var qemu: Task<CommandResult?, Never>?
        var relay: Task<Void, Never>?
        var qmp: QMPClient?
        var qga: QGAClient?
        var destroyed = false
        /// Set while the helper goes away on purpose (a reboot): its port closing is no news.
        var helperLossExpected = false
        var portWatch: Task<Void, Never>?
        var consoleWatch: Task<Void, Never>?
        /// A restore failed because of the saved state itself (it did not verify, load or run).
        var savedStateFailed = false
        /// The `--baseimage` block node exists in this QEMU (it outlives the device's unplugging).
        var baseImageNode = false
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
        try Self.writeFile(paths.ownerFile, "\(getpid())\n")
    }

    var qga: QGAClient? { handles.withLock { $0.qga } }
    var hasEnded: Bool { qemuEnded.withLock { $0 } }
    /// Whether ``destroy(graceful:removeDirectory:)`` ran (a close or a signal stopped a boot).
    var isDestroyed: Bool { handles.withLock { $0.destroyed } }
    /// Whether a failed restore was the saved state's fault, so that the state must go.
    var savedStateFailed: Bool { handles.withLock { $0.savedStateFailed } }

    /// Starts QEMU on a fresh overlay over the image and waits until the guest agent answers
    /// and the guest helper is up.
    func boot(kvm: Bool) async throws(VirtError) {
        let deadline = ContinuousClock.now + options.bootTimeout
        let format = options.imageFormat
        try await runner.check(QemuCommands.createOverlay(base: options.image, format: format, overlay: paths.overlay))
        try await runner.check(Command("cp", ["--", options.efiVars, paths.efiVars]))
        let (_, qga) = try await start(kvm: kvm, incoming: false)
        try await waitForAgent(qga, until: deadline)
        try await startHelper(qga, previousBootID: nil)
    }

    /// Starts QEMU on the overlay and EFI variables already in the directory, connects the
    /// monitor, the agent and the auxverb relay, and watches the helper's port.
    func start(kvm: Bool, incoming: Bool) async throws(VirtError) -> (QMPClient, QGAClient) {
        let logFD = open(paths.qemuLog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard logFD >= 0 else { throw VirtError(.io, "cannot create \(paths.qemuLog)") }
        let command = QemuCommands.qemu(options, paths, kvm: kvm, incoming: incoming)
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
        let portWatch = Task { await self.watchHelperPort(qmp) }
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

    /// Waits for the guest agent to answer, watching for QEMU dying meanwhile, and for a guest
    /// that booted to a login prompt without starting an agent (an image without
    /// qemu-guest-agent): the agent is then installed over the serial console
    /// (``ConsoleAgentInstaller``), and if it still does not answer, the boot fails soon
    /// after instead of at the boot timeout.
    func waitForAgent(_ qga: QGAClient, until deadline: ContinuousClock.Instant) async throws(VirtError) {
        var promptSince: ContinuousClock.Instant?
        var attempted = false
        // A failed installation is reported only if the agent stays silent: an image with an
        // agent that is merely slow (a starved guest) and a locked root must still boot.
        var installFailure: VirtError?
        while true {
            try checkAlive("while booting")
            do {
                try await qga.sync(timeout: .seconds(3))
                return
            } catch  where error.code == .timeout {
                log.debug("guest agent not answering yet")
            } catch {
                // The agent's socket closing is how QEMU dying shows here first: name QEMU.
                await waitForEnd(.seconds(3))
                try checkAlive("while booting")
                throw error
            }
            var now = ContinuousClock.now
            // Until a login prompt shows, the firmware may say it found nothing to boot: no
            // point waiting for an agent then.
            if promptSince == nil,
                let gaveUp = ConsoleWatch.firmwareGaveUp(ConsoleWatch.head(of: paths.consoleLog))
            {
                throw VirtError(.badImage, ConsoleWatch.firmwareMessage(gaveUp, image: options.image) + consoleTail())
            }
            if promptSince == nil, ConsoleWatch.showsLoginPrompt(consoleTail(8192)) {
                log.debug("a login prompt is on the serial console; the agent has \(AgentInstall.grace) from now")
                promptSince = now
            }
            if let since = promptSince, !attempted, now - since > AgentInstall.grace {
                attempted = true
                do {
                    try await ConsoleAgentInstaller(
                        user: options.consoleUser ?? "root", password: options.consolePassword,
                        consolePath: paths.console, bootTimeout: options.bootTimeout,
                        consoleTail: { self.consoleTail() },
                        checkAlive: { when throws(VirtError) in try self.checkAlive(when) }
                    ).install(until: deadline)
                    now = ContinuousClock.now
                    promptSince = now
                    log.debug("the agent has \(ConsoleWatch.agentGrace) from now")
                } catch {
                    try checkAlive("while installing qemu-guest-agent over the serial console")
                    log.debug("\(error.message); the agent has until \(ConsoleWatch.agentGrace) after the prompt")
                    installFailure = error
                    now = ContinuousClock.now
                }
            }
            if let since = promptSince, attempted, now - since > ConsoleWatch.agentGrace {
                if let installFailure { throw installFailure }
                throw VirtError(
                    .testbedFailure,
                    "the guest booted to a login prompt and qemu-guest-agent was installed and started over the serial "
                        + "console, but no guest agent answered within \(ConsoleWatch.agentGrace.formattedSeconds) after "
                        + "it: the image needs qemu-guest-agent installed and enabled (debusine-virt-qemu reaches the "
                        + "guest only through it)\(consoleTail())")
            }
            guard now < deadline else {
                throw VirtError(
                    .testbedFailure,
                    "the guest agent did not answer within \(options.bootTimeout.formattedSeconds): does the image "
                        + "have qemu-guest-agent installed and enabled?\(consoleTail())")
            }
        }
    }

    /// Installs the guest helper through the agent, starts it, and waits for its hello.
    func startHelper(_ qga: QGAClient, previousBootID: String?) async throws(VirtError) {
        try await qga.writeFile(path: GuestHelperScript.guestPath, contents: Array(GuestHelperScript.source.utf8))
        let pid: Int
        do {
            pid = try await qga.exec(
                path: "/bin/sh",
                arguments: ["-c", GuestHelperScript.launcher, "sh", "/usr/bin/python3"]
                    + GuestHelperScript.arguments(port: "/dev/virtio-ports/\(GuestHelperScript.portName)"),
                captureOutput: true)
        } catch {
            throw VirtError(
                .testbedFailure,
                "cannot start the guest helper with /usr/bin/python3 (the image needs python3-minimal): \(error.message)"
            )
        }
        do {
            _ = try await relay.waitForHelper(notBootID: previousBootID, timeout: .seconds(60))
        } catch {
            var detail = ""
            if let result = try? await qga.waitForExec(pid: pid, timeout: .seconds(2)) {
                detail =
                    ": helper ended with \(result.exitCode.map(String.init) ?? "?"): "
                    + String(decoding: result.standardError, as: UTF8.self)
            }
            throw VirtError(.testbedFailure, "the guest helper did not come up\(detail) (\(error.message))")
        }
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

    /// Notices the helper dying in the guest (killed, out of memory): its port closes on the
    /// guest side. Commands in flight then fail at once instead of waiting for ever, and a new
    /// helper is started through the agent.
    private func watchHelperPort(_ qmp: QMPClient) async {
        for await event in qmp.events
        where event.name == "VSERPORT_CHANGE" && event.data["id"]?.stringValue == QemuCommands.helperPortID
            && event.data["open"]?.boolValue == false
        {
            let expected = handles.withLock { $0.helperLossExpected || $0.destroyed }
            guard !expected, let qga else { continue }
            await relay.helperGone("the guest helper went away inside the guest")
            // A guest going down closes the port too: restart only in a guest that still runs.
            try? await Task.sleep(for: .seconds(3))
            guard !handles.withLock({ $0.helperLossExpected || $0.destroyed }), !hasEnded,
                (try? await qga.sync(timeout: .seconds(5))) != nil
            else {
                log.debug("the helper's port closed and the guest is going down")
                continue
            }
            log.warning("the guest helper went away inside the guest; starting a new one")
            do {
                try await startHelper(qga, previousBootID: nil)
            } catch {
                log.error("cannot restart the guest helper: \(error.message)")
            }
        }
    }

    /// The helper is about to go away with a reboot the server asked for.
    func expectHelperLoss() {
        handles.withLock { $0.helperLossExpected = true }
    }

    /// Waits until the guest runs a boot with a different id, then restarts the helper in it.
    func waitForReboot(previousBootID: String, timeout: Duration) async throws(VirtError) {
        handles.withLock { $0.helperLossExpected = true }
        defer { handles.withLock { $0.helperLossExpected = false } }
        await relay.helperGone("the testbed is rebooting")
        guard let qga else { throw VirtError(.testbedFailure, "no guest agent connection") }
        let newBoot = try await Deadline(after: timeout).poll(every: .seconds(1)) { () throws(VirtError) -> Bool in
            try checkAlive("while rebooting")
            guard let id = try? await bootID(qga) else { return false }
            return !id.isEmpty && id != previousBootID
        }
        guard newBoot else {
            if Task.isCancelled { throw VirtError(.timeout, "waiting for the testbed to reboot was cancelled") }
            throw VirtError(.timeout, "the testbed did not come back from reboot\(consoleTail())")
        }
        try await startHelper(qga, previousBootID: nil)
    }

    /// The guest's boot id, asked through the agent (the helper may be down). Not with
    /// guest-file-read: its large read count makes the kernel's sysctl handler fail with ENOMEM.
    func bootID(_ qga: QGAClient) async throws(VirtError) -> String {
        try await qga.sync(timeout: .seconds(3))
        let pid = try await qga.exec(
            path: "/bin/cat", arguments: ["/proc/sys/kernel/random/boot_id"], captureOutput: true)
        let result = try await qga.waitForExec(pid: pid, timeout: .seconds(10))
        guard result.exitCode == 0 else {
            throw VirtError(
                .testbedFailure,
                "cannot read the guest's boot id: \(String(decoding: result.standardError, as: UTF8.self))")
        }
        return String(decoding: result.standardOutput, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
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
