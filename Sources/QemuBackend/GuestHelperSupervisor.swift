import Foundation
import GuestHelper
import QemuMonitor
import Synchronization
import VirtCore

/// What ``GuestHelperSupervisor`` needs to know of the VM it serves.
protocol GuestHelperHost: Sendable {
    /// The agent connection, once there is one.
    var qga: QGAClient? { get }
    /// The server is tearing the VM down, or QEMU ended: the helper's going is no news then.
    var isGoingAway: Bool { get }
    /// Throws an error naming `when` if the VM was shut down or QEMU ended.
    func checkAlive(_ when: String) throws(VirtError)
    /// The end of the serial console, for error messages (empty when there is none).
    func consoleTail(_ count: Int) -> String
}

/// The guest helper's life in one VM: installed and started through the guest agent, started
/// again when it dies inside a guest that still runs, and awaited in the new boot after a
/// reboot. The auxverb relay carries the commands; this decides when a helper should be there.
final class GuestHelperSupervisor: Sendable {
    let relay: AuxverbRelay
    /// Set while the helper goes away on purpose (a reboot): its port closing is no news.
    private let lossExpected = Mutex(false)

    init(relay: AuxverbRelay) {
        self.relay = relay
    }

    /// Installs the guest helper through the agent, starts it, and waits for its hello.
    func start(_ qga: QGAClient, previousBootID: String?) async throws(VirtError) {
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

    /// Notices the helper dying in the guest (killed, out of memory): its port closes on the
    /// guest side. Commands in flight then fail at once instead of waiting for ever, and a new
    /// helper is started through the agent. Runs until `qmp`'s events end.
    func watchPort(_ qmp: QMPClient, of host: some GuestHelperHost) async {
        for await event in qmp.events
        where event.name == "VSERPORT_CHANGE"
            && event.data(as: QMP.SerialPortChange.self)
                == QMP.SerialPortChange(id: QemuCommands.helperPortID, open: false)
        {
            guard !isLossExpected(host), let qga = host.qga else { continue }
            await relay.helperGone("the guest helper went away inside the guest")
            // A guest going down closes the port too: restart only in a guest that still runs.
            try? await Task.sleep(for: .seconds(3))
            guard !isLossExpected(host), (try? await qga.sync(timeout: .seconds(5))) != nil else {
                log.debug("the helper's port closed and the guest is going down")
                continue
            }
            log.warning("the guest helper went away inside the guest; starting a new one")
            do {
                try await start(qga, previousBootID: nil)
            } catch {
                log.error("cannot restart the guest helper: \(error.message)")
            }
        }
    }

    private func isLossExpected(_ host: some GuestHelperHost) -> Bool {
        lossExpected.withLock { $0 } || host.isGoingAway
    }

    /// The helper is about to go away with a reboot the server asked for.
    func expectLoss() {
        lossExpected.withLock { $0 = true }
    }

    /// Waits until the guest runs a boot with a different id, then starts the helper in it.
    func waitForReboot(
        of host: some GuestHelperHost, previousBootID: String, timeout: Duration
    ) async throws(VirtError) {
        lossExpected.withLock { $0 = true }
        defer { lossExpected.withLock { $0 = false } }
        await relay.helperGone("the testbed is rebooting")
        guard let qga = host.qga else { throw VirtError(.testbedFailure, "no guest agent connection") }
        let newBoot = try await Deadline(after: timeout).poll(every: .seconds(1)) { () throws(VirtError) -> Bool in
            try host.checkAlive("while rebooting")
            guard let id = try? await Self.bootID(qga) else { return false }
            return !id.isEmpty && id != previousBootID
        }
        guard newBoot else {
            if Task.isCancelled { throw VirtError(.timeout, "waiting for the testbed to reboot was cancelled") }
            throw VirtError(.timeout, "the testbed did not come back from reboot\(host.consoleTail(4000))")
        }
        try await start(qga, previousBootID: nil)
    }

    /// The guest's boot id, asked through the agent (the helper may be down). Not with
    /// guest-file-read: its large read count makes the kernel's sysctl handler fail with ENOMEM.
    static func bootID(_ qga: QGAClient) async throws(VirtError) -> String {
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
}
