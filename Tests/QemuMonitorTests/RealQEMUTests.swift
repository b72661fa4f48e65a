import Testing
import VirtCore

@testable import QemuMonitor

private let qemuSystem = "/usr/bin/qemu-system-x86_64"

@Suite("QMP client against a real QEMU", .enabled(if: hostToolAvailable(qemuSystem)))
struct RealQEMUTests {
    @Test("a paused diskless machine answers query-status, reports events, and exits on quit")
    func statusAndQuit() async throws {
        try #require(access(qemuSystem, X_OK) == 0, "\(qemuSystem) is missing (install qemu-system-x86)")
        try await withPrivateDirectory("qmp-") { directory in
            let socket = directory + "/qmp.sock"
            // TCG only: /dev/kvm opens on these hosts but guests hang under it.
            let qemu = try ChildProcess(
                [
                    qemuSystem, "-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none", "-S",
                    "-nic", "none", "-m", "64", "-qmp", "unix:\(socket),server=on,wait=off",
                ],
                outputPath: directory + "/qemu.log")
            do {
                // Only a guard against a hang: QEMU starting on a starved host once took over 20 s.
                let client = try await QMPClient.connect(path: socket, timeout: .seconds(60))
                #expect(client.greeting.version.major >= 2)
                let status = try await client.execute("query-status", returning: QMP.StatusInfo.self)
                #expect(status == QMP.StatusInfo(status: "prelaunch", running: false))
                await #expect(throws: VirtError.self) { try await client.execute("no-such-command") }

                _ = try await client.execute("cont")
                _ = try await client.execute("stop")
                var events = client.events.makeAsyncIterator()
                #expect(await events.next()?.name == "RESUME")
                #expect(await events.next()?.name == "STOP")

                // QEMU may hang up before its reply to quit is read: both outcomes mean it quit.
                do {
                    _ = try await client.execute("quit", timeout: .seconds(60))
                } catch let error as VirtError {
                    #expect(error.message.hasSuffix("connection closed"))
                }
                #expect(await qemu.waitForExit(timeout: .seconds(60)) == 0)
                var remaining: [String] = []
                while let event = await events.next() { remaining.append(event.name) }
                #expect(remaining.allSatisfy { $0 == "SHUTDOWN" })
                await client.close()
            } catch {
                await qemu.stop()
                throw error
            }
            await qemu.stop()
        }
    }
}
