import Testing
import VirtCore

@testable import QemuMonitor

private let qemuGA = "/usr/sbin/qemu-ga"

/// The agent runs on the host as whoever runs the tests: everything that could change the host is
/// blocked. File and exec commands stay, and the tests only use them inside their private directory.
private let blockedCommands = [
    "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid", "guest-set-time",
    "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw", "guest-fstrim",
    "guest-set-user-password", "guest-set-vcpus", "guest-set-memory-blocks", "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
]

/// Starts qemu-ga on a socket in a private directory, connects, runs `body`, and always stops the
/// agent and removes the directory.
private func withRealAgent(_ body: (QGAClient, String) async throws -> Void) async throws {
    try #require(access(qemuGA, X_OK) == 0, "\(qemuGA) is missing (install qemu-guest-agent)")
    try await withPrivateDirectory("qga-") { directory in
        let socket = directory + "/qga.sock"
        let agent = try ChildProcess(
            [qemuGA, "-m", "unix-listen", "-p", socket, "-t", directory, "-b", blockedCommands.joined(separator: ",")],
            outputPath: directory + "/qemu-ga.log")
        do {
            // Generous: with VMs booting beside it under TCG, even qemu-ga can be slow to start.
            let client: QGAClient
            do {
                client = try await QGAClient.connect(path: socket, timeout: .seconds(60))
            } catch {
                let output = (try? String(contentsOfFile: directory + "/qemu-ga.log", encoding: .utf8)) ?? ""
                throw VirtError(.testbedFailure, "\(error); qemu-ga said: \(output)")
            }
            do {
                try await body(client, directory)
            } catch {
                await client.close()
                throw error
            }
            await client.close()
        } catch {
            await agent.stop()
            throw error
        }
        await agent.stop()
    }
}

@Suite("QGA client against the real qemu-guest-agent", .enabled(if: hostToolAvailable(qemuGA)))
struct RealAgentTests {
    @Test("sync, ping, guest-info and a refused command behave as the agent really answers")
    func basics() async throws {
        try await withRealAgent { client, _ in
            try await client.sync(timeout: .seconds(60))
            try await client.ping(timeout: .seconds(60))
            let info = try await client.execute("guest-info", returning: AnyJSON.self)
            #expect(info["version"]?.stringValue?.isEmpty == false)
            let commands = info["supported_commands"]?.arrayValue ?? []
            #expect(commands.contains { $0["name"] == "guest-exec" && $0["enabled"] == true })
            #expect(commands.contains { $0["name"] == "guest-shutdown" && $0["enabled"] == false })
            await #expect(throws: VirtError.self) { try await client.execute("guest-shutdown") }
            // A second explicit sync mid-session is harmless.
            try await client.sync(timeout: .seconds(60))
            try await client.ping(timeout: .seconds(60))
        }
    }

    @Test("a file written in 1 MiB chunks reads back byte for byte")
    func fileRoundTrip() async throws {
        try await withRealAgent { client, directory in
            let contents = randomBytes(2 << 20 + 12345)
            let path = directory + "/data.bin"
            try await client.writeFile(path: path, contents: contents)
            #expect(try await client.readFile(path: path) == contents)
            try await client.writeFile(path: path, contents: Array("short\n".utf8))
            #expect(try await client.readFile(path: path) == Array("short\n".utf8))
            let error = await caughtError { _ = try await client.readFile(path: directory + "/missing") }
            #expect(error?.code == .testbedFailure)
            #expect(error?.message.hasPrefix("QGA guest-file-open: GenericError: failed to open file") == true)
        }
    }

    @Test("exec captures output, reports exit codes and signals, and feeds stdin")
    func exec() async throws {
        try await withRealAgent { client, _ in
            let echo = try await client.exec(path: "/bin/echo", arguments: ["hello", "world"], captureOutput: true)
            let echoed = try await client.waitForExec(pid: echo, timeout: .seconds(60))
            #expect(echoed == GuestExecResult(exitCode: 0, standardOutput: Array("hello world\n".utf8)))

            let failing = try await client.exec(
                path: "/bin/sh", arguments: ["-c", "echo oops >&2; exit 3"], captureOutput: true)
            let failed = try await client.waitForExec(pid: failing, timeout: .seconds(60))
            #expect(failed.exitCode == 3)
            #expect(failed.signal == nil)
            #expect(failed.standardError == Array("oops\n".utf8))

            let killed = try await client.exec(path: "/bin/sh", arguments: ["-c", "kill -9 $$"], captureOutput: false)
            let killedResult = try await client.waitForExec(pid: killed, timeout: .seconds(60))
            #expect(killedResult.signal == 9)
            #expect(killedResult.exitCode == nil)

            let input = randomBytes(1000)
            let cat = try await client.exec(
                path: "/bin/sh", arguments: ["-c", "cat; echo \"[$FOO]\""], environment: ["FOO=bar"], input: input,
                captureOutput: true)
            let catted = try await client.waitForExec(pid: cat, timeout: .seconds(60))
            #expect(catted.standardOutput == input + Array("[bar]\n".utf8))

            await #expect(throws: VirtError.self) {
                _ = try await client.exec(path: "/nonexistent/program", captureOutput: true)
            }
        }
    }

    @Test("only one client is served at a time: a second one gets answers once the first has closed")
    func oneClientAtATime() async throws {
        try await withRealAgent { first, directory in
            try await first.ping(timeout: .seconds(60))
            let second = try await QGAClient.connect(path: directory + "/qga.sock", timeout: .seconds(60))
            let error = await caughtError { try await second.sync(timeout: .milliseconds(300)) }
            #expect(error?.code == .timeout, "the agent must not answer a second client while the first is connected")
            await first.close()
            // A bound on waiting, not on the agent: this suite shares 2 cores with VM tests in CI.
            try await second.sync(timeout: .seconds(60))
            try await second.ping(timeout: .seconds(60))
            await second.close()
        }
    }
}
