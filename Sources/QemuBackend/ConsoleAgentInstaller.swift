import QemuMonitor
import VirtCore

/// Installs qemu-guest-agent over the serial console into a guest that shows a login prompt but
/// has no agent: what a person at the console would do, with the boot's deadline.
///
/// The instance gives it the console's socket and two views of itself: the end of the console
/// for messages, and whether QEMU still runs (a QEMU that died explains a failed login better
/// than the login's own error).
struct ConsoleAgentInstaller {
    let user: String
    let password: String?
    let consolePath: String
    let bootTimeout: Duration
    let consoleTail: () -> String
    let checkAlive: (String) throws(VirtError) -> Void

    /// Logs in as `user` on the serial console (which shows a login prompt) and installs and
    /// starts qemu-guest-agent with ``AgentInstall/script``, then logs out. Fails with an error
    /// naming qemu-guest-agent, what was tried and the end of the console when that is not
    /// possible (root needs a password, no network, no apt), within the boot deadline.
    func install(until deadline: ContinuousClock.Instant) async throws(VirtError) {
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
                throw failure("the boot timeout (\(bootTimeout.formattedSeconds)) passed")
            }
            return boot.remaining(atMost: limit)
        }
        let console = try await SerialConsole.connect(path: consolePath, timeout: try left(.seconds(10)))
        let status: Int32
        do throws(VirtError) {
            let login = try await console.logIn(
                user: user, password: password, timeout: try left(AgentInstall.loginTimeout))
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
                    AgentInstall.script, password: password, "the installation of qemu-guest-agent",
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
