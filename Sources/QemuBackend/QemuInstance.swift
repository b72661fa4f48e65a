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
    /// (``installAgentOverConsole(until:)``), and if it still does not answer, the boot fails soon
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
                    try await installAgentOverConsole(until: deadline)
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

    /// Logs in as root on the serial console (which shows a login prompt) and installs and
    /// starts qemu-guest-agent with ``AgentInstall/script``, then logs out. Fails with an error
    /// naming qemu-guest-agent, what was tried and the end of the console when that is not
    /// possible (root needs a password, no network, no apt), within the boot deadline.
    func installAgentOverConsole(until deadline: ContinuousClock.Instant) async throws(VirtError) {
        let user = options.consoleUser ?? "root"
        log.info(
            "no guest agent answers and the guest shows a login prompt: logging in as \(user) on the serial console "
                + "to install qemu-guest-agent")
        let started = ContinuousClock.now
        func failure(_ reason: String) -> VirtError {
            VirtError(
                .testbedFailure,
                "the image needs qemu-guest-agent installed and enabled (debusine-virt-qemu reaches the guest only "
                    + "through it): no guest agent answered, and installing it over the serial console failed: "
                    + "\(reason)\(consoleTail())")
        }
        let boot = Deadline(deadline)
        func left(_ limit: Duration) throws(VirtError) -> Duration {
            guard !boot.hasPassed else {
                throw failure("the boot timeout (\(options.bootTimeout.formattedSeconds)) passed")
            }
            return boot.remaining(atMost: limit)
        }
        let console = try await SerialConsole.connect(path: paths.console, timeout: try left(.seconds(10)))
        let status: Int32
        do throws(VirtError) {
            let login = try await console.logIn(
                user: user, password: options.consolePassword, timeout: try left(AgentInstall.loginTimeout))
            log.info("logged in as \(user) on the serial console; installing qemu-guest-agent with apt-get")
            switch login {
            case .root:
                status = try await console.run(
                    AgentInstall.script, "the installation of qemu-guest-agent", timeout: try left(AgentInstall.timeout)
                )
            case .user(let uid):
                guard user != "root" else {
                    throw VirtError(
                        .testbedFailure, "logging in as root on the serial console gave a shell of uid \(uid)")
                }
                // As autopkgtest-virt-qemu does with a --user that is not root: sudo, with the
                // same password.
                status = try await console.runWithSudo(
                    AgentInstall.script, password: options.consolePassword, "the installation of qemu-guest-agent",
                    timeout: try left(AgentInstall.timeout))
            }
            await console.logOut()
            await console.close()
        } catch {
            await console.close()
            try checkAlive("while installing qemu-guest-agent over the serial console")
            throw failure(error.message)
        }
        switch status {
        case 0:
            log.info(
                "qemu-guest-agent installed and started over the serial console in "
                    + "\((ContinuousClock.now - started).formattedSeconds)")
        case AgentInstall.aptFailed:
            throw failure(
                "logged in as \(user) and ran apt-get update and apt-get install qemu-guest-agent, which failed: "
                    + "the guest needs network access to an apt archive that has it")
        case AgentInstall.startFailed:
            throw failure("qemu-guest-agent is installed but systemctl start qemu-guest-agent failed")
        default:
            throw failure("the installation script ended with status \(status)")
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
        guard newBoot else { throw VirtError(.timeout, "the testbed did not come back from reboot\(consoleTail())") }
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

/// What the serial console tells about a boot.
enum ConsoleWatch {
    /// How long the guest agent may take to answer once it was installed and started over the
    /// console: room for a slow TCG guest on a loaded host.
    static let agentGrace: Duration = .seconds(45)

    /// Whether the end of the console output is a getty login prompt (`HOST login:`). Kernel
    /// messages may follow it, on its line and after: the kernel writes to the same console.
    static func showsLoginPrompt(_ text: String) -> Bool {
        // By isNewline: "\r\n" is one Character, which "\n" does not match.
        var lines = text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).suffix(40).map { line in
            var line = Substring(line)
            while let last = line.last, last == "\r" || last == " " { line = line.dropLast() }
            return line
        }
        while let last = lines.last, last.isEmpty || isKernelMessage(last) { lines.removeLast() }
        guard var line = lines.last, !line.contains("Last login:") else { return false }
        // `HOST login: [   42.06] kvm: ...`: the prompt, then a kernel message on its line.
        if let prompt = line.range(of: " login: "), isKernelMessage(line[prompt.upperBound...]) {
            line = line[..<prompt.upperBound].dropLast()
        }
        return line.hasSuffix(" login:")
    }

    /// `[   12.345678] text`: a kernel message with its timestamp.
    static func isKernelMessage(_ line: Substring) -> Bool {
        guard line.first == "[", let end = line.firstIndex(of: "]") else { return false }
        let stamp = line[line.index(after: line.startIndex)..<end].drop { $0 == " " }
        return !stamp.isEmpty && stamp.allSatisfy { $0.isNumber || $0 == "." }
    }
}

/// Installing qemu-guest-agent over the serial console into an image that lacks it, as a
/// person at the console would: log in as root (an empty password, as Debian's nocloud images
/// have), apt-get install it, start it.
enum AgentInstall {
    /// How long the agent gets after a login prompt shows before the console is used. Debian
    /// starts the agent with its virtio-serial port, well before getty.
    static let grace: Duration = .seconds(10)
    /// For logging in and seeing a shell answer.
    static let loginTimeout: Duration = .seconds(90)
    /// For the whole script (within the boot timeout).
    static let timeout: Duration = .seconds(600)
    /// The script's status when apt-get could not install the package, and when systemctl could
    /// not start it.
    static let aptFailed: Int32 = 101
    static let startFailed: Int32 = 102

    /// The command line typed into the root shell: a constant, never built from input. It
    /// installs qemu-guest-agent unless it is there (an agent that was only slow), retrying
    /// `apt-get update` while the guest's network may still be coming up, and starts it (udev
    /// starts it when its port shows up; systemctl makes sure). Its output goes to the console
    /// (and so to console.log); the caller appends the status marker.
    static let script =
        "s=0; if ! command -v qemu-ga >/dev/null; then n=0; until apt-get -q update; do n=$((n+1)); "
        + "if [ $n -ge 3 ]; then break; fi; sleep 5; done; DEBIAN_FRONTEND=noninteractive apt-get -q -y "
        + "--no-install-recommends install qemu-guest-agent || s=\(aptFailed); fi; if [ $s = 0 ]; then "
        + "systemctl start qemu-guest-agent || s=\(startFailed); fi; (exit $s)"
}
