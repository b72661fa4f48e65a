import QemuMonitor
import VirtCore

/// How a cold boot waits for its guest agent: watching for QEMU dying meanwhile, for firmware
/// that found nothing to boot, and for a guest that reached a login prompt without an agent
/// (which gets one over the serial console, or fails soon after).
struct AgentWait {
    let instance: QemuInstance

    /// Returns when the agent answers. An image without qemu-guest-agent gets it installed
    /// over the serial console (``ConsoleAgentInstaller``); if the agent still does not answer,
    /// the boot fails soon after instead of at the boot timeout.
    func run(_ qga: QGAClient, until deadline: ContinuousClock.Instant) async throws(VirtError) {
        var promptSince: ContinuousClock.Instant?
        var attempted = false
        // A failed installation is reported only if the agent stays silent: an image with an
        // agent that is merely slow (a starved guest) and a locked root must still boot.
        var installFailure: VirtError?
        while true {
            try instance.checkAlive("while booting")
            do {
                try await qga.sync(timeout: .seconds(3))
                return
            } catch  where error.code == .timeout {
                log.debug("guest agent not answering yet")
            } catch {
                // The agent's socket closing is how QEMU dying shows here first: name QEMU.
                await instance.waitForEnd(.seconds(3))
                try instance.checkAlive("while booting")
                throw error
            }
            var now = ContinuousClock.now
            // Until a login prompt shows, the firmware may say it found nothing to boot: no
            // point waiting for an agent then.
            if promptSince == nil,
                let gaveUp = ConsoleWatch.firmwareGaveUp(ConsoleWatch.head(of: instance.paths.consoleLog))
            {
                throw VirtError(
                    .badImage,
                    ConsoleWatch.firmwareMessage(
                        gaveUp, image: instance.options.image, firmware: instance.options.firmware)
                        + instance.consoleTail())
            }
            // A kernel panic or an initramfs rescue shell waits for ever: say so now.
            if let failed = ConsoleWatch.bootFailed(ConsoleLog.tail(of: instance.paths.consoleLog, characters: 4000)) {
                throw VirtError(
                    .badImage,
                    ConsoleWatch.bootFailedMessage(failed, image: instance.options.image) + instance.consoleTail())
            }
            if promptSince == nil, ConsoleWatch.showsLoginPrompt(instance.consoleTail(8192)) {
                log.debug("a login prompt is on the serial console; the agent has \(AgentInstall.grace) from now")
                promptSince = now
            }
            if let since = promptSince, !attempted, now - since > AgentInstall.grace {
                attempted = true
                do {
                    try await ConsoleAgentInstaller(
                        user: instance.options.consoleUser ?? "root", password: instance.options.consolePassword,
                        consolePath: instance.paths.console, bootTimeout: instance.options.bootTimeout,
                        consoleTail: { instance.consoleTail() },
                        checkAlive: { when throws(VirtError) in try instance.checkAlive(when) }
                    ).install(until: deadline)
                    now = ContinuousClock.now
                    promptSince = now
                    log.debug("the agent has \(ConsoleWatch.agentGrace) from now")
                } catch {
                    try instance.checkAlive("while installing qemu-guest-agent over the serial console")
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
                        + "guest only through it)\(instance.consoleTail())")
            }
            guard now < deadline else {
                throw VirtError(
                    .testbedFailure,
                    "the guest agent did not answer within \(instance.options.bootTimeout.formattedSeconds): does the image "
                        + "have qemu-guest-agent installed and enabled?\(instance.consoleTail())")
            }
        }
    }
}
