import CommandRunner
import Foundation
import TarFormat
import Testing
import VirtCore
import VirtTestSupport

/// A server or `import` run on a bad or hostile image: how it ended, within how long, and what
/// it left behind in its private TMPDIR (and image cache).
struct Refusal {
    let status: ProcessStatus
    let standardOutput: String
    let standardError: String
    let took: Duration
    let left: [String]

    /// The lines of stderr that are errors.
    var errors: [String] { standardError.split(separator: "\n").filter { $0.contains(": error: ") }.map(String.init) }

    /// Runs `argv` with TMPDIR set to `parent`, with nothing on stdin, and collects the result.
    static func run(_ argv: [String], parent: String, cache: String? = nil) async throws -> Refusal {
        let clock = ContinuousClock()
        let start = clock.now
        let process = try ServerProcess(argv, environment: ["TMPDIR": parent])
        let status = try await process.wait(timeout: .seconds(120))
        let took = clock.now - start
        var output: [String] = []
        while let line = try await process.readLine(timeout: .seconds(5)) { output.append(line) }
        var left = TestPaths.contents(of: parent).map { "\(parent)/\($0)" }
        if let cache { left += TestPaths.contents(of: cache).map { "\(cache)/\($0)" } }
        let processes = try await SubprocessRunner().run(Command("pgrep", ["-a", "-f", parent]))
        left += processes.outputText.split(separator: "\n").map { "process \($0)" }
        return Refusal(
            status: status, standardOutput: output.joined(separator: "\n"), standardError: process.standardError,
            took: took, left: left)
    }

    /// The refusal every case must show: exit 65 before any banner, one error line saying
    /// `words`, within seconds, and nothing left behind.
    func expectRefused(_ checks: Checks, saying words: String, status expected: ProcessStatus = .exited(65)) {
        checks.expect(status == expected, "ended with \(status), not \(expected); stderr:\n\(standardError)")
        checks.expect(standardOutput.isEmpty, "wrote to stdout (a banner?): \(standardOutput)")
        checks.expect(errors.count == 1, "not one error line:\n\(standardError)")
        checks.expect(errors.contains { $0.contains(words) }, "the error does not say \(words):\n\(standardError)")
        // It takes 0.1-0.3 s; the bound only has to hold on a starved machine (the whole test
        // process stood still for 35 s once) and stay far below any boot timeout.
        checks.expect(took < .seconds(60), "took \(took) to fail")
        checks.expect(left.isEmpty, "left behind: \(left)")
    }
}

extension FaultSuite {
    /// Issue 13 item 5 and issue 14 items 1 and 6: images that must not be booted or imported
    /// are refused before anything runs, in seconds, saying why.
    @Suite("Bad and hostile images", .serialized)
    struct HostileImageTests {
        let runner = SubprocessRunner()

        /// Runs debusine-virt-qemu on `image` (a path or a URL) in a private TMPDIR and image cache.
        func qemu(_ image: String, work: String) async throws -> Refusal {
            let parent = "\(work)/tmp"
            let cache = "\(work)/cache"
            for directory in [parent, cache] where access(directory, F_OK) != 0 {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
            }
            return try await Refusal.run(
                [
                    TestPaths.executable("debusine-virt-qemu"), "--accel", "tcg", "--network", "none", "--cache-dir",
                    cache, image,
                ], parent: parent, cache: cache)
        }

        /// One refused image as a fault case of the report.
        func refuses(
            _ fault: String, image: (String) async throws -> String, saying words: @escaping (String) -> String
        ) async throws {
            try await faultCase(
                "qemu", fault, expected: "refused before the banner, exit 65, within seconds, nothing left",
                hostile: true
            ) { checks in
                let work = try TestPaths.makeTemporaryDirectory("dv-image.")
                defer { TestPaths.removeTree(work) }
                let path = try await image(work)
                try await qemu(path, work: work).expectRefused(checks, saying: words(work))
            }
        }

        @Test("/etc/hostname is no disk image", .enabled(if: Backend.qemuEnabled))
        func hostname() async throws {
            try await refuses("/etc/hostname as the image", image: { _ in "/etc/hostname" }) { _ in
                "the image /etc/hostname is not a disk image"
            }
        }

        @Test("an empty file is no disk image", .enabled(if: Backend.qemuEnabled))
        func empty() async throws {
            try await refuses(
                "an empty file as the image",
                image: { work in
                    try Data().write(to: URL(fileURLWithPath: "\(work)/empty.qcow2"))
                    return "\(work)/empty.qcow2"
                }
            ) { work in "the image \(work)/empty.qcow2 is empty" }
        }

        @Test("a raw disk without a partition table is refused", .enabled(if: Backend.qemuEnabled))
        func noPartitionTable() async throws {
            try await refuses(
                "a raw disk of zeros (no partition table)",
                image: { work in
                    try await TestDisks.raw("\(work)/zero.raw", size: 10 << 20, layout: nil)
                    return "\(work)/zero.raw"
                }
            ) { work in "the image \(work)/zero.raw has no partition table" }
        }

        @Test("a GPT disk without an EFI system partition is refused", .enabled(if: Backend.qemuEnabled))
        func noESP() async throws {
            try await refuses(
                "a GPT disk without an EFI system partition",
                image: { work in
                    try await TestDisks.raw("\(work)/gpt.raw", size: 10 << 20, layout: .gptWithoutESP)
                    return "\(work)/gpt.raw"
                }
            ) { work in "the image \(work)/gpt.raw has no EFI system partition" }
        }

        @Test(
            "a qcow2 backed by a host file is refused, naming the file; unrefused, the guest's disk is that file",
            .enabled(if: Backend.qemuEnabled))
        func backingFile() async throws {
            try await faultCase(
                "qemu", "a qcow2 image whose backing file is a host file",
                expected: "refused before the banner naming the file; nothing of it reaches a guest", hostile: true
            ) { checks in
                let work = try TestPaths.makeTemporaryDirectory("dv-image.")
                defer { TestPaths.removeTree(work) }
                let secret = "\(work)/host-secret"
                try Data("HOSTSECRETMARKER".utf8).write(to: URL(fileURLWithPath: secret))
                let image = "\(work)/hostile.qcow2"
                try await TestDisks.qcow2(image, backing: secret)
                // Why: the overlay the server used to put over IMAGE (qemu-img create -F qcow2
                // -b IMAGE) is the guest's disk, and its first bytes are the host file's.
                let overlay = "\(work)/overlay.qcow2"
                try await runner.check(
                    Command("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image, overlay]))
                let read = try await runner.check(
                    Command("qemu-io", ["-r", "-U", "-f", "qcow2", "-c", "read -v 0 16", overlay]))
                checks.expect(read.contains("HOSTSECRETMARKER"), "the overlay does not read the host file: \(read)")
                unlink(overlay)

                let refusal = try await qemu(image, work: work)
                refusal.expectRefused(checks, saying: "the image \(image) has a backing file (\(secret))")
            }
        }

        @Test("a qcow2 with an external data file is refused", .enabled(if: Backend.qemuEnabled))
        func dataFile() async throws {
            try await refuses(
                "a qcow2 image with an external data file",
                image: { work in
                    try await TestDisks.qcow2("\(work)/data.qcow2", dataFile: "\(work)/data.raw")
                    return "\(work)/data.qcow2"
                }
            ) { work in "the image \(work)/data.qcow2 has an external data file (\(work)/data.raw)" }
        }

        @Test(
            "a qcow2 with a json: backing specification is refused, and nothing it names is opened",
            .enabled(if: Backend.qemuEnabled))
        func jsonBacking() async throws {
            try await refuses(
                "a qcow2 image with a json: backing specification (nbd)",
                image: { work in
                    // A unix socket nobody listens on: were it opened, nothing would leave the host.
                    let spec =
                        #"json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":"\#(work)/n.sock"}}}"#
                    try await TestDisks.qcow2("\(work)/json.qcow2", backing: spec)
                    return "\(work)/json.qcow2"
                }
            ) { work in "the image \(work)/json.qcow2 has a backing file given as a json: specification" }
        }

        @Test(
            "an image URL whose download has a backing file is refused and leaves no cache entry",
            .enabled(if: Backend.qemuEnabled))
        func urlWithBackingFile() async throws {
            try await refuses(
                "an image URL (file://) of a qcow2 with a backing file",
                image: { work in
                    try Data("HOSTSECRETMARKER".utf8).write(to: URL(fileURLWithPath: "\(work)/host-secret"))
                    try await TestDisks.qcow2("\(work)/hostile.qcow2", backing: "\(work)/host-secret")
                    return "file://\(work)/hostile.qcow2"
                }
            ) { work in "the image file://\(work)/hostile.qcow2 has a backing file (\(work)/host-secret)" }
        }

        /// `debusine-virt-incus import [--vm] FILE` in a private TMPDIR: refused, and no alias made.
        func importRefuses(
            _ fault: String, vm: Bool = true, image: (String) async throws -> String, saying words: String
        ) async throws {
            try await faultCase(
                "incus", fault, expected: "import refused, exit 65, no alias, nothing left", hostile: true
            ) { checks in
                let work = try TestPaths.makeTemporaryDirectory("dv-image.")
                defer { TestPaths.removeTree(work) }
                let parent = "\(work)/tmp"
                try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: false)
                let file = try await image(work)
                let id = "hostile-\(getpid())"
                let refusal = try await Refusal.run(
                    [TestPaths.executable("debusine-virt-incus"), "import", "--artifact-id", id]
                        + (vm ? ["--vm"] : []) + [file],
                    parent: parent)
                refusal.expectRefused(checks, saying: words)
                let alias = try await runner.run(Command("incus", ["image", "info", "artifact/\(id)"]))
                checks.expect(!alias.status.succeeded, "artifact/\(id) was imported")
                if alias.status.succeeded {
                    _ = try? await runner.run(Command("incus", ["image", "delete", "artifact/\(id)"]))
                }
            }
        }

        @Test(
            "import --vm refuses a tarball whose image member is a symbolic link to a host file",
            .enabled(if: Backend.incusEnabled))
        func importSymlinkMember() async throws {
            try await importRefuses(
                "import --vm: a tarball whose disk.img is a symlink to /etc/shadow",
                image: { work in
                    try FileManager.default.createDirectory(
                        atPath: "\(work)/member", withIntermediateDirectories: false)
                    try FileManager.default.createSymbolicLink(
                        atPath: "\(work)/member/disk.img", withDestinationPath: "/etc/shadow")
                    try await runner.check(
                        Command(
                            "tar",
                            ["--create", "--file", "\(work)/image.tar", "--directory", "\(work)/member", "disk.img"]))
                    return "\(work)/image.tar"
                }, saying: "is a symbolic link (to /etc/shadow), not a regular file")
        }

        /// Issue 14 item 5: a system tarball is data from an artifact store.
        @Test(
            "import refuses a system tarball with a `..` member or a link above /, and a malformed pax record",
            .enabled(if: Backend.incusEnabled),
            arguments: [
                ("a member named ./../../etc/cron.d/x", "parent", "`..` component"),
                ("a symbolic link to /../../etc/shadow", "link", "climbs above /"),
                ("a pax record `1 x`", "pax", "malformed"),
            ])
        func importHostileTarball(_ fault: String, _ kind: String, _ words: String) async throws {
            try await importRefuses(
                "import: a system tarball with \(fault)", vm: false,
                image: { work in
                    let path = "\(work)/rootfs.tar"
                    let writer = try BlockWriter(path: path)
                    func member(_ name: String, _ type: UInt8, link: String = "", data: [UInt8] = []) throws {
                        try writer.writeMember(
                            TarHeader(name: name, type: type, mode: 0o755, size: data.count, linkName: link, mtime: 0),
                            data: data)
                    }
                    try member("./sbin/init", UInt8(ascii: "0"), data: Array("#!/bin/sh\n".utf8))
                    switch kind {
                    case "parent": try member("./../../etc/cron.d/x", UInt8(ascii: "0"), data: Array("x".utf8))
                    case "link": try member("./escape", UInt8(ascii: "2"), link: "/../../etc/shadow")
                    default: try member("PaxHeaders/x", UInt8(ascii: "x"), data: Array("1 x".utf8))
                    }
                    try member("./etc/os-release", UInt8(ascii: "0"), data: Array("ID=debian\n".utf8))
                    try writer.write([UInt8](repeating: 0, count: 1024))
                    try writer.flush()
                    return path
                }, saying: words)
        }

        @Test("import --vm refuses a qcow2 with a backing file", .enabled(if: Backend.incusEnabled))
        func importBackingFile() async throws {
            try await importRefuses(
                "import --vm: a qcow2 whose backing file is /etc/shadow",
                image: { work in
                    try await TestDisks.qcow2("\(work)/hostile.qcow2", backing: "/etc/shadow")
                    return "\(work)/hostile.qcow2"
                }, saying: "has a backing file (/etc/shadow)")
        }
    }
}
