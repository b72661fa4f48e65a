import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// Where in a session the interruption arrives.
enum Phase: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case opening, open, auxverb, copy, reverting, rebooting, closing

    var testDescription: String {
        switch self {
        case .opening: "while opening"
        case .open: "while open and idle"
        case .auxverb: "while an auxverb command runs"
        case .copy: "while a copydown runs"
        case .reverting: "while reverting"
        case .rebooting: "while rebooting"
        case .closing: "while closing"
        }
    }
}

/// What interrupts it: a signal to the server, or its stdin closing (the caller went away).
enum Interruption: Sendable, CustomTestStringConvertible {
    case signal(Int32)
    case endOfFile

    static let all: [Interruption] = [.signal(SIGTERM), .signal(SIGINT), .signal(SIGHUP), .endOfFile]

    var testDescription: String {
        switch self {
        case .signal(SIGTERM): "SIGTERM"
        case .signal(SIGINT): "SIGINT"
        case .signal(SIGHUP): "SIGHUP"
        case .signal(let number): "signal \(number)"
        case .endOfFile: "stdin closed"
        }
    }

    var expected: String {
        switch self {
        case .signal: "cleans up, dies by the signal; nothing left"
        case .endOfFile: "finishes the step, cleans up, exits 12; nothing left"
        }
    }
}

/// Interrupts a real server at `phase` and checks that it ends as the protocol says and leaves
/// no instance, directory, socket or process behind.
///
/// QEMU servers boot (`--no-snapshot`) when the step interrupted is opening or reverting: there a
/// restore from a saved state would be over before the signal comes. At the other steps they
/// restore, as servers do by default, which spares a TCG boot each (a reboot boots either way).
/// ``QemuSavedStateInterruptionTests`` interrupts saves and restores.
func interrupt(_ backend: Backend, _ phase: Phase, _ interruption: Interruption) async throws {
    let fault = "\(interruption.testDescription) \(phase.testDescription)"
    try await faultCase(backend.rawValue, fault, expected: interruption.expected) { checks in
        let work = try TestPaths.makeTemporaryDirectory("dv-fault-work.")
        defer { TestPaths.removeTree(work) }
        let boots = backend == .qemu && [.opening, .reverting].contains(phase)
        // Incus: the spare made at once, so that the interruptions after open land while incusd
        // makes it (by default it waits for a quiet host, and the steps here come sooner).
        let options = boots ? ["--no-snapshot"] : backend == .incus ? ["--eager-spare"] : []
        let server = try await ServerUnderTest.start(backend, options: options)
        let process = server.process
        var command: ServerProcess?
        do {
            if phase == .opening {
                process.write(line: "open")
            } else {
                let scratch = try await server.open()
                switch phase {
                case .opening, .open:
                    break
                case .auxverb:
                    command = try startAuxverb(try await server.auxverb(), ["sleep", "600"])
                case .copy:
                    // Sparse, so the host reads fast; every byte still crosses into the testbed.
                    try makeSparseFile("\(work)/big", size: backend == .qemu ? 512 << 20 : 2 << 30)
                    process.write(line: "copydown \(work)/big \(scratch)/big")
                case .reverting:
                    process.write(line: "revert")
                case .rebooting:
                    process.write(line: "reboot")
                case .closing:
                    process.write(line: "close")
                }
            }
            try await Task.sleep(for: phase == .closing ? .milliseconds(300) : backend.settle)
            let clock = ContinuousClock()
            let start = clock.now
            switch interruption {
            case .signal(let number): process.signal(number)
            case .endOfFile: process.closeStandardInput()
            }
            let status = try await process.wait(timeout: .seconds(900))
            switch interruption {
            case .signal(let number):
                checks.expect(status == .signaled(number), "ended with \(status), not by the signal")
                checks.expect(
                    process.standardError.contains("cleaning up"), "no word on stderr:\n\(process.standardError)")
                checks.expect(clock.now - start < .seconds(180), "cleaning up took \(clock.now - start)")
            case .endOfFile:
                checks.expect(status == .exited(12), "ended with \(status), not exit 12")
                checks.expect(
                    process.standardError.contains("end of file"), "no word on stderr:\n\(process.standardError)")
            }
            if let command {
                // The command's connection to the testbed is gone: it must end, not hang.
                let ended = try? await command.wait(timeout: .seconds(120))
                checks.expect(ended != nil, "the auxverb command outlived the server")
            }
            let left = try await server.leftovers()
            checks.expect(left.isEmpty, "left behind: \(left)")
        } catch {
            command?.signal(SIGKILL)
            await server.discard()
            throw error
        }
        await server.discard()
    }
}

/// Outside the fault suite's one-at-a-time order: containers are light, and this matrix is
/// long enough (28 cases) to run beside the QEMU faults rather than after them.
@Suite("Interrupting debusine-virt-incus at every step", .serialized)
struct IncusInterruptionTests {
    @Test(
        "every signal and closed stdin at every step: the protocol's ending, nothing left",
        .enabled(if: Backend.incusEnabled), .timeLimit(.minutes(20)),
        arguments: Phase.allCases, Interruption.all)
    func interruption(phase: Phase, interruption: Interruption) async throws {
        try await interrupt(.incus, phase, interruption)
    }
}

extension FaultSuite {
    @Suite("Interrupting debusine-virt-qemu at every step", .serialized)
    struct QemuInterruptionTests {
        /// Each step once, each signal at two or more, closed stdin at the longest: a VM boot costs
        /// 20-40 s under TCG here, so the whole matrix (the Incus suite runs it) is too long for CI.
        /// DEBUSINE_VIRT_FAULT_FULL=1 runs every combination, as the Incus suite does.
        static let cases: [(Phase, Interruption)] =
            ProcessInfo.processInfo.environment["DEBUSINE_VIRT_FAULT_FULL"] == "1"
            ? Phase.allCases.flatMap { phase in Interruption.all.map { (phase, $0) } } : ci

        static let ci: [(Phase, Interruption)] = [
            (.opening, .signal(SIGTERM)), (.open, .signal(SIGHUP)), (.auxverb, .signal(SIGINT)),
            (.copy, .signal(SIGTERM)), (.reverting, .signal(SIGHUP)), (.rebooting, .endOfFile),
            (.closing, .signal(SIGINT)),
        ]

        @Test(
            "signals and closed stdin at every step: the protocol's ending, nothing left",
            .enabled(if: Backend.qemuEnabled), .guestSlot(minutes: 40), arguments: cases)
        func interruption(phase: Phase, interruption: Interruption) async throws {
            try await interrupt(.qemu, phase, interruption)
        }
    }
}

extension FaultSuite {
    /// SIGTERM while the first boot saves the VM, and while a revert restores it: the server
    /// cleans up as at any other step, and no half-saved state stays in the cache.
    @Suite("Interrupting debusine-virt-qemu while it saves or restores a VM state", .serialized)
    struct QemuSavedStateInterruptionTests {
        /// Sends SIGTERM once stderr shows `marker`, then checks the ending and the leftovers.
        func terminate(_ server: ServerUnderTest, at marker: String, cache: String, _ checks: Checks) async throws {
            let deadline = ContinuousClock.now + .seconds(900)
            while !server.process.standardError.contains(marker) {
                guard ContinuousClock.now < deadline else {
                    checks.expect(false, "no \(marker) on stderr:\n\(server.process.standardError)")
                    return
                }
                try await Task.sleep(for: .milliseconds(20))
            }
            server.process.signal(SIGTERM)
            let status = try await server.process.wait(timeout: .seconds(300))
            checks.expect(status == .signaled(SIGTERM), "ended with \(status), not by the signal")
            checks.expect(
                server.process.standardError.contains("cleaning up"),
                "no word on stderr:\n\(server.process.standardError)")
            let left = try await server.leftovers()
            checks.expect(left.isEmpty, "left behind: \(left)")
            let halfSaved = TestPaths.contents(of: "\(cache)/states").filter { $0.contains(".tmp.") }
            // A killed save leaves its directory to the next save of that state, which removes it;
            // what must never happen is a half-saved state under an entry's name.
            for name in TestPaths.contents(of: "\(cache)/states") where StateNames.isKey(name) {
                checks.expect(
                    access("\(cache)/states/\(name)/SHA256SUMS", F_OK) == 0, "an entry without a manifest: \(name)")
            }
            if !halfSaved.isEmpty { print("a killed save left \(halfSaved), for the next save to remove") }
        }

        @Test(
            "SIGTERM while saving the VM state, then while restoring it: cleaned up, no half-saved state",
            .enabled(if: Backend.qemuEnabled), .guestSlot(minutes: 30))
        func savingAndRestoring() async throws {
            let cache = try TestPaths.makeTemporaryDirectory("dv-fault-cache.")
            defer { TestPaths.removeTree(cache) }
            try await faultCase(
                "qemu", "SIGTERM while saving the VM state", expected: "cleans up, dies by the signal; nothing left"
            ) { checks in
                let server = try await ServerUnderTest.start(.qemu, options: ["--cache-dir", cache])
                server.process.write(line: "open")
                do {
                    try await terminate(server, at: "saving the booted VM", cache: cache, checks)
                } catch {
                    await server.discard()
                    throw error
                }
                await server.discard()
            }
            try await faultCase(
                "qemu", "SIGTERM while restoring a saved state", expected: "cleans up, dies by the signal; nothing left"
            ) { checks in
                let server = try await ServerUnderTest.start(.qemu, options: ["--cache-dir", cache])
                do {
                    _ = try await server.open()
                    checks.expect(
                        server.process.standardError.contains("saved the VM state"),
                        "the state was not saved:\n\(server.process.standardError)")
                    checks.expect(
                        TestPaths.contents(of: "\(cache)/states").allSatisfy { !$0.contains(".tmp.") },
                        "the killed save's directory outlived the next save")
                    server.process.write(line: "revert")
                    try await terminate(server, at: "restoring the saved VM state", cache: cache, checks)
                } catch {
                    await server.discard()
                    throw error
                }
                await server.discard()
            }
        }
    }
}

/// How saved-state entries are named in the cache's states/ directory.
enum StateNames {
    static func isKey(_ name: String) -> Bool { name.utf8.count == 64 && name.allSatisfy(\.isHexDigit) }
}
