import CommandRunner
import Foundation
import TarFormat
import Testing
import VirtCore
import VirtTestSupport

@testable import IncusBackend

/// The tarball rewriting, checked against GNU tar: what it lists and extracts.
@Suite("Rewriting a root file system tarball under rootfs/")
struct RootfsRewriterTests {
    let runner = SubprocessRunner()

    /// A tree with what real root file systems hold: long and UTF-8 names, hard and symbolic
    /// links, an xattr, odd modes.
    func makeTree(_ root: String) async throws {
        try await runner.check(
            Command(
                "sh",
                [
                    "-ec",
                    #"""
                    cd "$1"
                    mkdir -p usr/sbin etc/systemd "a/$(printf 'd%.0s' $(seq 1 60))/$(printf 'e%.0s' $(seq 1 60))" 'odd ü, %'
                    printf 'ELF' > usr/sbin/real
                    ln -s ../lib/systemd/systemd usr/sbin/init
                    echo hello > 'odd ü, %/file name'
                    ln 'odd ü, %/file name' 'odd ü, %/hard link'
                    long="a/$(printf 'd%.0s' $(seq 1 60))/$(printf 'e%.0s' $(seq 1 60))/long file"
                    echo long > "$long"
                    ln "$long" "$long 2"
                    chmod 4755 usr/sbin/real
                    setfattr -n user.test -v value usr/sbin/real 2>/dev/null || true
                    """#, "sh", root,
                ]))
    }

    @Test("members move under rootfs/, hard links with them, symbolic link targets unchanged, contents intact")
    func rewritesNames() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tar.")
        defer { TestPaths.removeTree(work) }
        let tree = work + "/tree"
        try FileManager.default.createDirectory(atPath: tree, withIntermediateDirectories: false)
        try await makeTree(tree)
        for format in ["gnu", "posix"] {
            let input = "\(work)/in-\(format).tar"
            try await runner.check(
                Command(
                    "tar", ["--create", "--format=\(format)", "--xattrs", "--file", input, "--directory", tree, "."]))
            let output = "\(work)/out-\(format).tar"
            let writer = try BlockWriter(path: output)
            let rewriter = RootfsRewriter(
                watchedPaths: ["usr/sbin/init", "sbin/init"], capturedFiles: ["usr/sbin/real"])
            let findings = try rewriter.rewrite(try BlockReader(path: input), into: writer)
            try writer.write([UInt8](repeating: 0, count: 1024))
            try writer.flush()
            #expect(findings.presentPaths == ["usr/sbin/init"])
            #expect(findings.captured["usr/sbin/real"] == Array("ELF".utf8))

            let before = try await runner.check(Command("tar", ["--list", "--file", input]))
                .split(separator: "\n").map { RootfsRewriter.relative(String($0)) }
            let after = try await runner.check(Command("tar", ["--list", "--file", output])).split(separator: "\n")
            #expect(after.map(String.init) == before.map { "rootfs/" + $0 }, "\(format)")

            let extracted = "\(work)/x-\(format)"
            try FileManager.default.createDirectory(atPath: extracted, withIntermediateDirectories: false)
            try await runner.check(
                Command("tar", ["--extract", "--xattrs", "--file", output, "--directory", extracted]))
            let diff = try await runner.run(Command("diff", ["-r", "--no-dereference", tree, "\(extracted)/rootfs"]))
            #expect(diff.status == .exited(0), "\(diff.outputText)")
            let root = "\(extracted)/rootfs"
            let first = try FileManager.default.attributesOfItem(atPath: "\(root)/odd ü, %/file name")
            let second = try FileManager.default.attributesOfItem(atPath: "\(root)/odd ü, %/hard link")
            #expect(first[.systemFileNumber] as? Int == second[.systemFileNumber] as? Int, "hard link kept")
            #expect(
                try FileManager.default.destinationOfSymbolicLink(atPath: "\(root)/usr/sbin/init")
                    == "../lib/systemd/systemd")
            let mode = try FileManager.default.attributesOfItem(atPath: "\(root)/usr/sbin/real")[.posixPermissions]
            #expect(mode as? Int == 0o4755)
        }
    }

    @Test("a truncated or non-tar input is an error, not a half image")
    func rejectsBrokenInput() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tar.")
        defer { TestPaths.removeTree(work) }
        let tree = work + "/tree"
        try FileManager.default.createDirectory(atPath: tree, withIntermediateDirectories: false)
        try await makeTree(tree)
        let input = "\(work)/in.tar"
        try await runner.check(Command("tar", ["--create", "--file", input, "--directory", tree, "."]))
        try await runner.check(Command("truncate", ["--size=2000", input]))
        let rewriter = RootfsRewriter(watchedPaths: [], capturedFiles: [])
        #expect(throws: VirtError.self) {
            try rewriter.rewrite(try BlockReader(path: input), into: try BlockWriter(path: "\(work)/out1.tar"))
        }
        let garbage = "\(work)/garbage"
        try Data(repeating: 0x41, count: 4096).write(to: URL(fileURLWithPath: garbage))
        #expect(throws: VirtError.self) {
            try rewriter.rewrite(try BlockReader(path: garbage), into: try BlockWriter(path: "\(work)/out2.tar"))
        }
    }

    /// An archive of hand-made members, as a hostile tarball is made.
    func forged(_ path: String, _ members: [(TarHeader, [UInt8])]) throws {
        let writer = try BlockWriter(path: path)
        for (header, data) in members { try writer.writeMember(header, data: data) }
        try writer.write([UInt8](repeating: 0, count: 1024))
        try writer.flush()
    }

    func member(_ name: String, _ type: Character = "0", link: String = "", data: [UInt8] = []) -> (TarHeader, [UInt8])
    {
        (
            TarHeader(
                name: name, type: UInt8(ascii: type.unicodeScalars.first ?? "0"), mode: 0o644, size: data.count,
                linkName: link, mtime: 0), data
        )
    }

    @Test(
        "hostile members are refused as a bad image: `..` in names and hard links, links above /, global paths, huge metadata"
    )
    func refusesHostileMembers() throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tar.")
        defer { TestPaths.removeTree(work) }
        var globalPath = PaxRecords()
        globalPath["path"] = "etc/shadow"
        let global = globalPath.encoded()
        var hugeName = member("././@LongLink", "L")
        hugeName.0.setSize(BlockReader.metadataLimit + 1)
        hugeName.0.updateChecksum()
        let cases: [(String, [(TarHeader, [UInt8])], String)] = [
            ("parent", [member("./../etc/cron.d/x")], "`..` component"),
            ("hard link", [member("./a", "1", link: "./../../etc/shadow")], "hard link"),
            ("absolute link", [member("./a", "2", link: "/../../etc/shadow")], "climbs above /"),
            (
                "global path",
                [(TarHeader(name: "g", type: UInt8(ascii: "g"), mode: 0, size: global.count, mtime: 0), global)],
                "global header"
            ),
            ("huge name", [hugeName], "metadata member"),
        ]
        let rewriter = RootfsRewriter(watchedPaths: [], capturedFiles: [])
        for (name, members, words) in cases {
            try forged("\(work)/\(name).tar", members + [member("./sbin/init")])
            do {
                _ = try rewriter.rewrite(
                    try BlockReader(path: "\(work)/\(name).tar"), into: try BlockWriter(path: "\(work)/\(name).out"))
                Issue.record("\(name): accepted")
            } catch {
                #expect(error.code == .badImage, "\(name): \(error)")
                #expect(error.message.contains(words), "\(name): \(error.message)")
            }
        }
        // What real packages ship: relative links with more `..` than their depth, absolute
        // links, names with dots.
        try forged(
            "\(work)/fine.tar",
            [
                member("./usr/share/doc/a", "2", link: "../../../../../usr/share/doc/b"),
                member("./etc/alternatives/x", "2", link: "/usr/bin/x"), member("./usr/lib/..hidden..", "0"),
                member("./usr/lib/x", "1", link: "./usr/lib/..hidden.."),
            ])
        _ = try rewriter.rewrite(
            try BlockReader(path: "\(work)/fine.tar"), into: try BlockWriter(path: "\(work)/fine.out"))
    }
}
