import Synchronization
import Testing
import VirtCore

@testable import QemuMonitor

/// A scripted terminal on the fake peer: each line the client types is echoed back as a tty
/// would (so the client must not mistake its own command for the guest's answer), then
/// `answer` says what the guest prints for it. Returns the lines typed, until the client hangs
/// up or `answer` returns nil.
private func playTerminal(
    _ peer: FakePeer, greeting: String? = nil, answer: @Sendable (String) -> String?
) async throws -> [String] {
    try await peer.waitForClient()
    if let greeting { peer.send(bytes: Array(greeting.utf8)) }
    var typed: [String] = []
    while true {
        let line: String
        do {
            line = String(decoding: try await peer.nextLine(), as: UTF8.self)
        } catch {
            return typed
        }
        typed.append(line)
        peer.send(bytes: Array("\(line)\r\n".utf8))
        guard let reply = answer(line) else { return typed }
        peer.send(bytes: Array(reply.utf8))
    }
}

/// What a Debian root shell prints for the client's probe and status lines.
private func shellAnswer(_ line: String, uid: String = "0", status: String = "0") -> String? {
    if line.hasPrefix("unset HISTFILE; printf") { return "debusine-virt-shell-\(uid)\r\nroot@vm:~# " }
    if line.hasSuffix("debusine-virt status \"$?\"") {
        return "Reading package lists...\r\ndebusine-virt-status-\(status)\r\nroot@vm:~# "
    }
    if line == "exit" { return "logout\r\n\r\nDebian GNU/Linux 12 vm ttyS0\r\n\r\nvm login: " }
    return nil
}

@Suite("The serial console dialogue (login, one command, logout) against a scripted terminal")
struct SerialConsoleTests {
    @Test("a nocloud-style console: root logs in without a password prompt, the command's status comes back")
    func rootWithoutPassword() async throws {
        try await withFakePeer { peer in
            let guest = Task {
                try await playTerminal(peer) { line in
                    line == "root" ? "Linux vm 6.1.0 x86_64\r\n\r\nroot@vm:~# " : shellAnswer(line, status: "0")
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            #expect(try await console.logInAsRoot(timeout: .seconds(120)) == .root)
            #expect(try await console.run("apt-get install x", "the test command", timeout: .seconds(120)) == 0)
            await console.logOut()
            await console.close()
            let typed = try await guest.value
            #expect(typed.first == "root")
            #expect(typed.contains("apt-get install x; printf '%s-%s-%s\\n' debusine-virt status \"$?\""))
            #expect(typed.last == "exit")
        }
    }

    @Test("a Password: prompt gets an empty answer; a failing command's status is returned as it is")
    func emptyPasswordAndFailure() async throws {
        try await withFakePeer { peer in
            let guest = Task {
                try await playTerminal(peer) { line in
                    switch line {
                    case "root": return "Password: "
                    case "": return "\r\nLast login: never\r\n# "
                    default: return shellAnswer(line, status: "101")
                    }
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            #expect(try await console.logInAsRoot(timeout: .seconds(120)) == .root)
            #expect(try await console.run("false", "the test command", timeout: .seconds(120)) == 101)
            await console.close()
            _ = try await guest.value
        }
    }

    @Test("root needing a password fails at once with a testbed failure saying so")
    func passwordNeeded() async throws {
        try await withFakePeer { peer in
            let guest = Task {
                try await playTerminal(peer) { line in
                    switch line {
                    case "root": return "Password: "
                    case "": return "\r\nLogin incorrect\r\nvm login: "
                    default: return nil
                    }
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            let clock = ContinuousClock()
            let start = clock.now
            let error = await #expect(throws: VirtError.self) { try await console.logInAsRoot(timeout: .seconds(120)) }
            #expect(error?.code == .testbedFailure)
            #expect(error?.message.contains("without a password") == true, "\(String(describing: error))")
            // Refused at once, not at the timeout (with room for a loaded machine).
            #expect(clock.now - start < .seconds(90))
            await console.close()
            _ = try await guest.value
        }
    }

    @Test("a shell that is not root's is reported with its uid")
    func notRoot() async throws {
        try await withFakePeer { peer in
            let guest = Task {
                try await playTerminal(peer) { line in
                    line == "root" ? "user@vm:~$ " : shellAnswer(line, uid: "1000")
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            #expect(try await console.logInAsRoot(timeout: .seconds(120)) == .user(uid: "1000"))
            await console.close()
            _ = try await guest.value
        }
    }

    @Test("a console that never answers times out within the bound, naming what it waited for")
    func silentConsole() async throws {
        try await withFakePeer { peer in
            let guest = Task { try await playTerminal(peer) { _ in "" } }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            let clock = ContinuousClock()
            let start = clock.now
            let error = await #expect(throws: VirtError.self) { try await console.logInAsRoot(timeout: .seconds(2)) }
            #expect(error?.code == .timeout)
            #expect(error?.message.contains("an answer to the login") == true, "\(String(describing: error))")
            // A bound against a hang, with room for a loaded machine (8.2 s once, for a 2 s timeout).
            #expect(clock.now - start < .seconds(60))
            await console.close()
            _ = try await guest.value
        }
    }

    @Test("a console that closes mid-command fails the command instead of waiting")
    func closedConsole() async throws {
        try await withFakePeer { peer in
            let guest = Task {
                try await playTerminal(peer) { line in
                    if line == "root" { return "# " }
                    if line.hasPrefix("unset HISTFILE") { return shellAnswer(line) }
                    peer.disconnect()
                    return nil
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            #expect(try await console.logInAsRoot(timeout: .seconds(120)) == .root)
            let error = await #expect(throws: VirtError.self) {
                try await console.run("sleep 100", "the test command", timeout: .seconds(30))
            }
            #expect(error?.code == .testbedFailure)
            await console.close()
            _ = try await guest.value
        }
    }

    @Test(
        "--user and --password: that user logs in with the password; the command runs through sudo, which gets it too")
    func userWithSudo() async throws {
        try await withFakePeer { peer in
            let passwords = Mutex(0)
            let guest = Task {
                try await playTerminal(peer) { line in
                    switch line {
                    case "tester": return "Password: "
                    case "s3cr3t w":
                        // First at login's prompt, then at sudo's.
                        let count = passwords.withLock { value -> Int in
                            value += 1
                            return value
                        }
                        return count == 1
                            ? "tester@vm:~$ " : "\r\nReading package lists...\r\ndebusine-virt-status-0\r\n$ "
                    default:
                        if line.hasPrefix("sudo -p ") { return "[sudo] debusine-virt-sudo%password:" }
                        return shellAnswer(line, uid: "1000")
                    }
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            #expect(
                try await console.logIn(user: "tester", password: "s3cr3t w", timeout: .seconds(120))
                    == .user(uid: "1000"))
            #expect(
                try await console.runWithSudo(
                    "apt-get install x", password: "s3cr3t w", "the test command", timeout: .seconds(120)) == 0)
            await console.close()
            let typed = try await guest.value
            #expect(Array(typed.prefix(2)) == ["tester", "s3cr3t w"])
            #expect(
                typed.contains(
                    "sudo -p 'debusine-virt-sudo%%password:' sh -c 'apt-get install x'; printf '%s-%s-%s\\n' debusine-virt status \"$?\""
                ), "\(typed)")
            #expect(typed.filter { $0 == "s3cr3t w" }.count == 2)
            #expect(
                !typed.contains { $0.contains("s3cr3t") && $0 != "s3cr3t w" }, "the password is never in a command line"
            )
        }
    }

    @Test("sudo that asks no password (NOPASSWD) returns the status; a script sudo cannot take is refused")
    func sudoWithoutPassword() async throws {
        try await withFakePeer { peer in
            let guest = Task {
                try await playTerminal(peer) { line in
                    if line == "tester" { return "$ " }
                    if line.hasPrefix("sudo -p ") { return "debusine-virt-status-7\r\n$ " }
                    return shellAnswer(line, uid: "1000")
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            #expect(
                try await console.logIn(user: "tester", password: nil, timeout: .seconds(120)) == .user(uid: "1000"))
            #expect(
                try await console.runWithSudo("false", password: nil, "the test command", timeout: .seconds(120)) == 7)
            let error = await #expect(throws: VirtError.self) {
                try await console.runWithSudo("echo 'x'", password: nil, "the test command", timeout: .seconds(5))
            }
            #expect(error?.code == .internalError)
            await console.close()
            _ = try await guest.value
        }
    }

    @Test("a wrong --password is an error naming the user, at once")
    func wrongPassword() async throws {
        try await withFakePeer { peer in
            let guest = Task {
                try await playTerminal(peer) { line in
                    switch line {
                    case "tester": return "Password: "
                    case "wrong": return "\r\nLogin incorrect\r\nvm login: "
                    default: return nil
                    }
                }
            }
            let console = try await SerialConsole.connect(path: peer.path, timeout: .seconds(120))
            let error = await #expect(throws: VirtError.self) {
                try await console.logIn(user: "tester", password: "wrong", timeout: .seconds(120))
            }
            #expect(error?.code == .testbedFailure)
            #expect(
                error?.message == "tester cannot log in on the serial console with the password given",
                "\(String(describing: error))")
            await console.close()
            _ = try await guest.value
        }
    }

    @Test("the first pattern in the output wins; at the same place the one listed first")
    func firstMatch() {
        let text = Array("abc Password: x# ".utf8)
        let patterns = ["# ", "Password:", "Pass"].map { Array($0.utf8) }
        let match = SerialConsole.firstMatch(patterns, in: text)
        #expect(match?.index == 1 && match?.start == 4 && match?.end == 13)
        #expect(SerialConsole.firstMatch([Array("zz".utf8)], in: text) == nil)
        #expect(SerialConsole.firstMatch([Array("# ".utf8)], in: Array("#".utf8)) == nil)
    }
}
