import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// The instance directory is 0700, everything in it ours and not writable by others, and its
/// sockets closed to others.
func expectPrivate(_ server: ServerUnderTest, _ checks: Checks) throws {
    let entries = TestPaths.contents(of: server.parent)
    checks.expect(entries.count == 1, "instance directories: \(entries)")
    for entry in entries {
        let directory = "\(server.parent)/\(entry)"
        var info = stat()
        checks.expect(lstat(directory, &info) == 0 && info.st_mode & 0o7777 == 0o700, "\(directory) is not 0700")
        checks.expect(info.st_uid == getuid(), "\(directory) is not ours")
        for name in TestPaths.contents(of: directory) {
            var file = stat()
            guard lstat("\(directory)/\(name)", &file) == 0 else { continue }
            let mode = String(file.st_mode & 0o777, radix: 8)
            checks.expect(file.st_uid == getuid(), "\(name) is not ours")
            checks.expect(file.st_mode & 0o022 == 0, "\(name) is writable by others (\(mode))")
            if file.st_mode & S_IFMT == S_IFSOCK {
                checks.expect(file.st_mode & 0o077 == 0, "socket \(name) is open to others (\(mode))")
            }
        }
    }
}

/// Checks the end of a session after a fault: exit 12 (or, for `expectStatus`, that status), one
/// clear line on stderr naming the cause, and nothing left behind.
func expectCleanFailure(
    _ server: ServerUnderTest, _ checks: Checks, naming words: [String], status expected: ProcessStatus = .exited(12)
) async throws {
    let status = try await server.process.wait(timeout: .seconds(600))
    checks.expect(status == expected, "ended with \(status), not \(expected); stderr:\n\(server.process.standardError)")
    let errors = server.process.standardError.split(separator: "\n").filter { $0.contains(": error: ") }
    checks.expect(!errors.isEmpty, "no error line on stderr:\n\(server.process.standardError)")
    let named = errors.contains { line in words.contains { line.localizedCaseInsensitiveContains($0) } }
    checks.expect(named, "the error does not name \(words):\n\(errors.joined(separator: "\n"))")
    let left = try await server.leftovers()
    checks.expect(left.isEmpty, "left behind: \(left)")
}

extension FaultSuite {
    @Suite("QEMU faults: a clear error, the protocol's failure, nothing leaked", .serialized)
    struct QemuFaultTests {
        let runner = SubprocessRunner()

        /// Kills the guest helper from a command it runs (the test image has no procps), then
        /// waits: the command must end because its helper died, not by itself.
        static let killHelper = #"""
            for p in /proc/[0-9]*; do
                [ "${p#/proc/}" = $$ ] && continue
                grep -q debusine-virt-helper "$p/cmdline" 2>/dev/null && kill -9 "${p#/proc/}"
            done
            sleep 600
            """#

        /// The pid QEMU wrote for the server's instance.
        func qemuPID(_ server: ServerUnderTest) throws -> pid_t {
            let directory = try #require(TestPaths.contents(of: server.parent).first { $0.hasPrefix("dvq.") })
            let text = try String(contentsOfFile: "\(server.parent)/\(directory)/qemu.pid", encoding: .utf8)
            return try #require(pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)))
        }

        @Test("QEMU killed from outside mid-session", .enabled(if: Backend.qemuEnabled), .guestSlot(minutes: 10))
        func qemuKilled() async throws {
            try await faultCase("qemu", "QEMU killed from outside mid-session", expected: "next request fails, exit 12")
            {
                checks in
                let server = try await ServerUnderTest.start(.qemu)
                let scratch = try await server.open()
                let auxverb = try await server.auxverb()
                try await faultCase(
                    "qemu", "modes of the instance directory and its sockets", expected: "0700 and 0600, owned by us",
                    { try expectPrivate(server, $0) })
                kill(try qemuPID(server), SIGKILL)
                try await Task.sleep(for: .seconds(1))
                let command = try await runner.run(Command(argv: auxverb + ["true"]))
                checks.expect(!command.status.succeeded, "an auxverb command succeeded without a VM")
                server.process.write(line: "copydown /etc/hostname \(scratch)/hostname")
                let reply = try await server.process.readLine(timeout: .seconds(300))
                checks.expect(reply != "ok", "a copy into a dead VM was reported as done")
                server.process.write(line: "revert")
                _ = try? await server.process.readLine(timeout: .seconds(300))
                server.process.closeStandardInput()
                let status = try await server.process.wait(timeout: .seconds(600))
                checks.expect(status == .exited(12), "ended with \(status)")
                checks.expect(
                    server.process.standardError.contains("QEMU exited")
                        || server.process.standardError.contains("testbed is gone"),
                    "the cause is not named:\n\(server.process.standardError)")
                let left = try await server.leftovers()
                checks.expect(left.isEmpty, "left behind: \(left)")
                await server.discard()
            }
        }

        @Test(
            "a hostile image path; the helper killed; the guest agent stopped; a guest that ignores shutdown",
            .enabled(if: Backend.qemuEnabled), .guestSlot(minutes: 10))
        func agentStoppedAndShutdownIgnored() async throws {
            try await faultCase(
                "qemu", "guest helper killed, guest agent stopped, then a guest that ignores shutdown",
                expected: "a new helper takes over; commands and reboot go on without the agent; close ends QEMU"
            ) { checks in
                // The image path is hostile too: it must reach QEMU as data.
                let work = try TestPaths.makeTemporaryDirectory("dv-hostile.")
                defer { TestPaths.removeTree(work) }
                let image = "\(work)/a $(touch pwned); b `id` 'c\".qcow2"
                try FileManager.default.createSymbolicLink(atPath: image, withDestinationPath: try Backend.qcow2())
                let server = try await ServerUnderTest.start(.qemu, options: ["--shutdown-timeout", "5"], image: image)
                _ = try await server.open()
                FaultReport.add(
                    backend: "qemu", fault: "an image path with spaces, quotes and shell syntax",
                    expected: "booted as given; no shell ran", hostile: false, held: access("pwned", F_OK) != 0)
                checks.expect(access("pwned", F_OK) != 0, "a shell ran the image path")
                var auxverb = try await server.auxverb()
                // The helper killed inside the guest: the command in flight fails at once, and
                // a new helper takes over.
                let clock = ContinuousClock()
                var start = clock.now
                let killed = try await runner.run(
                    Command(argv: auxverb + ["sh", "-c", Self.killHelper]))
                checks.expect(!killed.status.succeeded, "a command survived its helper: \(killed.status)")
                checks.expect(clock.now - start < .seconds(120), "the command hung for \(clock.now - start)")
                var back = false
                while !back && clock.now - start < .seconds(180) {
                    back = (try? await runner.run(Command(argv: auxverb + ["true"])))?.status.succeeded ?? false
                    if !back { try await Task.sleep(for: .seconds(2)) }
                }
                checks.expect(back, "no new helper took over:\n\(server.process.standardError)")
                // No agent: the session goes on through the helper, and a reboot still works.
                let stopped = try await runner.run(
                    Command(argv: auxverb + ["systemctl", "stop", "qemu-guest-agent.service"]))
                checks.expect(stopped.status.succeeded, "could not stop the agent: \(stopped.errorText)")
                let after = try await runner.run(Command(argv: auxverb + ["echo", "still here"]))
                checks.expect(after.outputText == "still here", "the auxverb died with the agent: \(after.errorText)")
                let rebooted = try await server.process.request("reboot")
                checks.expect(rebooted == "ok", "reboot without an agent replied \(rebooted)")
                auxverb = try await server.auxverb()
                // Now a guest that cannot power off: close must not wait for it for ever.
                let masked = try await runner.run(
                    Command(argv: auxverb + ["systemctl", "mask", "--runtime", "poweroff.target", "halt.target"]))
                checks.expect(masked.status.succeeded, "could not mask poweroff: \(masked.errorText)")
                start = clock.now
                let closed = try await server.process.request("close")
                checks.expect(closed == "ok", "close replied \(closed)")
                checks.expect(clock.now - start < .seconds(120), "close took \(clock.now - start)")
                server.process.write(line: "quit")
                let status = try await server.process.wait(timeout: .seconds(120))
                checks.expect(status == .exited(0), "ended with \(status)")
                let left = try await server.leftovers()
                checks.expect(left.isEmpty, "left behind: \(left)")
                await server.discard()
            }
        }

        @Test(
            "wrong firmware and a truncated image fail open clearly",
            .enabled(if: Backend.qemuEnabled), .guestSlot(minutes: 10))
        func badFirmwareAndTruncatedImage() async throws {
            let work = try TestPaths.makeTemporaryDirectory("dv-fault-work.")
            defer { TestPaths.removeTree(work) }
            try Data(repeating: 0xFF, count: 4 << 20).write(to: URL(fileURLWithPath: "\(work)/garbage.fd"))
            let truncated = "\(work)/truncated.qcow2"
            try await runner.check(
                Command("sh", ["-c", #"head -c 67108864 "$1" > "$2""#, "sh", try Backend.qcow2(), truncated]))
            for (fault, options, image, words) in [
                // Garbage firmware prints nothing and never resets: only the boot timeout ends it.
                (
                    "wrong EFI firmware", ["--efi-code", "\(work)/garbage.fd", "--boot-timeout", "20"], nil as String?,
                    ["QEMU exited", "did not answer", "guest agent", "boot", "image"]
                ),
                // The initramfs fails its fsck on the missing clusters and waits at its shell: open
                // ends there, long before the boot timeout.
                (
                    "a truncated qcow2 image", ["--boot-timeout", "300"], truncated,
                    ["stopped booting from the image \(truncated): its initramfs gave up"]
                ),
            ] {
                try await faultCase("qemu", fault, expected: "open fails: exit 12, one clear line; nothing left") {
                    checks in
                    let server = try await ServerUnderTest.start(.qemu, options: options, image: image)
                    server.process.write(line: "open")
                    try await expectCleanFailure(server, checks, naming: words)
                    await server.discard()
                }
            }
        }

        @Test(
            "a full disk under the instance directory fails open clearly",
            .enabled(if: Backend.qemuEnabled && getuid() == 0), .guestSlot(minutes: 5))
        func instanceDiskFull() async throws {
            try await faultCase(
                "qemu", "disk full in the instance directory", expected: "open fails: exit 12; nothing left"
            ) {
                checks in
                try await withTmpfs(size: "256k") { tmpfs in
                    let server = try await ServerUnderTest.start(.qemu, parent: tmpfs)
                    server.process.write(line: "open")
                    try await expectCleanFailure(server, checks, naming: ["space", "No space", "write", "copy"])
                }
            }
        }

        @Test(
            "an image cache on a full disk, a download cut off and a wrong sha256 fail before the banner",
            .enabled(if: getuid() == 0), .timeLimit(.minutes(5)))
        func downloads() async throws {
            let http = try await TestHTTPServer()
            do {
                try await downloadFaults(http)
            } catch {
                await http.stop()
                throw error
            }
            await http.stop()
        }

        private func downloadFaults(_ http: TestHTTPServer) async throws {
            try http.add("image.qcow2", size: 2 << 20)
            let wrong = String(repeating: "0", count: 64)
            for (fault, image, options, words, small) in [
                ("image download cut off half way", http.url("image.qcow2", mode: "half"), [], ["image.qcow2"], false),
                (
                    "downloaded image with the wrong sha256", http.url("image.qcow2"), ["--sha256", wrong], [wrong],
                    false
                ),
                ("image cache on a full disk", http.url("image.qcow2"), [], ["space", "image.qcow2"], true),
            ] {
                try await faultCase("qemu", fault, expected: "no banner, one clear line, cache consistent") { checks in
                    try await withTmpfs(size: small ? "1m" : "64m") { cache in
                        let result = try await runner.run(
                            Command(
                                TestPaths.executable("debusine-virt-qemu"),
                                ["--cache-dir", cache] + options + [image]))
                        checks.expect(
                            !result.status.succeeded && result.outputText.isEmpty,
                            "\(result.status) \(result.outputText)")
                        checks.expect(
                            words.contains { result.errorText.contains($0) }, "not named \(words): \(result.errorText)")
                        checks.expect(
                            result.errorText.split(separator: "\n").count <= 3, "not short: \(result.errorText)")
                        // No entry and no partial download: only locks may remain.
                        let files = try await runner.check(
                            Command("find", [cache, "-type", "f", "!", "-name", "*.lock"]))
                        checks.expect(files.isEmpty, "left in the cache: \(files)")
                    }
                }
            }
        }
    }
}

extension FaultSuite {
    @Suite("Incus faults: a clear error, the protocol's failure, nothing leaked", .serialized)
    struct IncusFaultTests {
        let runner = SubprocessRunner()

        @Test(
            "the instance deleted behind the server's back",
            .enabled(if: Backend.incusEnabled), .timeLimit(.minutes(5)))
        func instanceDeleted() async throws {
            try await faultCase(
                "incus", "instance deleted behind our back", expected: "requests fail clearly; nothing left"
            ) {
                checks in
                let server = try await ServerUnderTest.start(.incus)
                let scratch = try await server.open()
                let auxverb = try await server.auxverb()
                // Only the instance in use goes: a spare for the next revert may be there too.
                let running = try await ServerUnderTest.runningInstance(auxverb)
                let names = try await ServerUnderTest.instances(ownedBy: server.process.pid)
                checks.expect(names.contains(running), "\(running) is not among the server's instances \(names)")
                try await runner.check(Command("incus", ["delete", "--force", running]))
                let command = try await runner.run(Command(argv: auxverb + ["true"]))
                checks.expect(!command.status.succeeded, "an auxverb command succeeded without an instance")
                let copy = try await server.process.request("copydown /etc/hostname \(scratch)/hostname")
                checks.expect(copy != "ok", "a copy into a deleted instance was reported as done")
                // Revert gives a fresh instance: the session can go on.
                server.process.write(line: "revert")
                let reverted = try await server.process.readLine(timeout: .seconds(300))
                checks.expect(reverted?.hasPrefix("ok /") == true, "revert replied \(reverted ?? "nothing")")
                let again = try await runner.run(Command(argv: try await server.auxverb() + ["true"]))
                checks.expect(again.status.succeeded, "the reverted testbed does not work: \(again.errorText)")
                let replacement = try? await ServerUnderTest.runningInstance(try await server.auxverb())
                checks.expect(replacement != running, "revert did not give a new instance")
                _ = try await server.process.request("close")
                server.process.write(line: "quit")
                checks.expect(try await server.process.wait() == .exited(0), "quit did not end it")
                let left = try await server.leftovers()
                checks.expect(left.isEmpty, "left behind: \(left)")
                await server.discard()
            }
        }

        @Test(
            "incusd unreachable mid-session (a remote whose socket goes away), then gc once it is back",
            .enabled(if: Backend.incusEnabled), .timeLimit(.minutes(5)))
        func daemonGone() async throws {
            try await faultCase(
                "incus", "incusd unreachable mid-session", expected: "exit 12 naming incusd; gc cleans up after"
            ) { checks in
                let work = try TestPaths.makeTemporaryDirectory("dv-fault-work.")
                defer { TestPaths.removeTree(work) }
                let config = "\(work)/config"
                try FileManager.default.createDirectory(atPath: config, withIntermediateDirectories: false)
                let socket = "\(work)/incus.sock"
                var proxy = try SocketProxy.start(listen: socket, forwardTo: "/var/lib/incus/unix.socket")
                let environment = ["INCUS_CONF": config]
                try await runner.check(
                    Command("incus", ["remote", "add", "flaky", "unix://\(socket)"], environment: environment))
                let image = try Backend.artifact()
                let server = try await ServerUnderTest.start(
                    .incus, options: ["--remote", "flaky"], image: image, parent: nil, environment: environment)
                let scratch = try await server.open()
                await proxy.stop()
                server.process.write(line: "copydown /etc/hostname \(scratch)/hostname")
                _ = try? await server.process.readLine(timeout: .seconds(120))
                server.process.closeStandardInput()
                let status = try await server.process.wait(timeout: .seconds(300))
                checks.expect(status == .exited(12), "ended with \(status)")
                checks.expect(
                    server.process.standardError.localizedCaseInsensitiveContains("incusd")
                        || server.process.standardError.contains("incus daemon"),
                    "incusd is not named:\n\(server.process.standardError)")
                // The daemon is back: gc finds what the dead session could not delete. incusd may
                // still be making the spare it was asked for before the socket went away (unpacking
                // the image takes seconds, and the instance is listed only once it exists): gc
                // takes it on its next run, as the next server's start-up sweep would.
                proxy = try SocketProxy.start(listen: socket, forwardTo: "/var/lib/incus/unix.socket")
                let clock = ContinuousClock()
                let deadline = clock.now + .seconds(120)
                var runs = 0
                var left: [String] = []
                repeat {
                    if runs > 0 { try await Task.sleep(for: .seconds(2)) }
                    let gc = try await runner.run(
                        Command(
                            TestPaths.executable("debusine-virt-incus"), ["gc", "--remote", "flaky"],
                            environment: environment))
                    runs += 1
                    checks.expect(gc.status.succeeded, "gc failed: \(gc.outputText)\n\(gc.errorText)")
                    left = try await server.leftovers()
                } while !left.isEmpty && clock.now < deadline
                if runs > 1 { print("daemonGone: gc ran \(runs) times before nothing was left") }
                await proxy.stop()
                checks.expect(left.isEmpty, "left behind after \(runs) runs of gc: \(left)")
                await server.discard()
            }
        }
    }
}

/// Mounts a tmpfs of `size` on a fresh private directory for `body` (root only).
func withTmpfs(size: String, _ body: (String) async throws -> Void) async throws {
    let directory = try TestPaths.makeTemporaryDirectory("dv-tmpfs.")
    let runner = SubprocessRunner()
    try await runner.check(Command("mount", ["-t", "tmpfs", "-o", "size=\(size),mode=0700", "tmpfs", directory]))
    do {
        try await body(directory)
    } catch {
        _ = try? await runner.run(Command("umount", ["-l", directory]))
        TestPaths.removeTree(directory)
        throw error
    }
    _ = try? await runner.run(Command("umount", ["-l", directory]))
    TestPaths.removeTree(directory)
}
