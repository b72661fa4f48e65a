import CommandRunner
import Foundation
import TarFormat
import Testing
import VirtCore
import VirtTestSupport

/// The filter between a testbed's archive and the host's tar, fed archives written here
/// member by member (a hostile testbed writes whatever bytes it likes), and its output
/// checked with GNU tar, as `copyup` runs it.
@Suite("The tar safety filter between a testbed's archive and the host")
struct TarSafetyFilterTests {
    let runner = SubprocessRunner()

    /// One member: its header and data.
    struct Member {
        var header: TarHeader
        var data: [UInt8] = []

        init(_ name: String, _ type: Character, mode: Int = 0o644, data: String = "", link: String = "") {
            let bytes = Array(data.utf8)
            header = TarHeader(
                name: name, type: UInt8(ascii: type.unicodeScalars.first ?? "0"), mode: mode, size: bytes.count,
                linkName: link, mtime: 1_700_000_000)
            self.data = bytes
        }

        /// A header whose size field says `size` while `data` follows, padded to blocks.
        init(header: TarHeader, rawData: [UInt8]) {
            self.header = header
            data = rawData
        }

        static func pax(_ records: [(String, String)]) -> Member {
            var pax = PaxRecords()
            for (key, value) in records { pax.records.append((key, Array(value.utf8))) }
            let data = pax.encoded()
            var member = Member("PaxHeaders/x", "x", data: "")
            member.header.setSize(data.count)
            member.header.updateChecksum()
            member.data = data
            return member
        }
    }

    func write(_ members: [Member], to path: String, end: Bool = true) throws {
        let writer = try BlockWriter(path: path)
        for member in members { try writer.writeMember(member.header, data: member.data) }
        if end { try writer.write([UInt8](repeating: 0, count: 1024)) }
        try writer.flush()
    }

    func filter(_ input: String, _ output: String) throws(VirtError) -> TarSafetyFilter.Outcome {
        let writer = try BlockWriter(path: output)
        return try TarSafetyFilter().filter(try BlockReader(path: input), into: writer)
    }

    /// `tar --list --verbose` lines as (mode string, name).
    func listing(_ archive: String) async throws -> [(String, String)] {
        let text = try await runner.check(
            Command("tar", ["--list", "--verbose", "--numeric-owner", "--file", archive]))
        return text.split(separator: "\n").map { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            return (String(fields[0]), fields.dropFirst(5).joined(separator: " "))
        }
    }

    @Test("device nodes, FIFOs and global headers are left out; files, directories and links pass with their data")
    func leavesOutSpecialFiles() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tarfilter.")
        defer { TestPaths.removeTree(work) }
        var device = Member("./null", "3", mode: 0o666)
        device.header.setOctal(329, 8, 1)
        device.header.setOctal(337, 8, 3)
        device.header.updateChecksum()
        try write(
            [
                Member("./", "5", mode: 0o7777),
                Member("./suid", "0", mode: 0o4755, data: "x"),
                Member("./sgid/", "5", mode: 0o3777),
                Member("./fifo", "6", mode: 0o666),
                device,
                Member("./disk", "4", mode: 0o660),
                Member.pax([("path", "./global-name")]),
                Member("./after", "0", mode: 0o644, data: "after"),
                Member("./link", "2", mode: 0o777, link: "after"),
                Member("./hard", "1", mode: 0o644, link: "./after"),
            ].enumerated().map { index, member in
                // The global header: a `g` member, which tar would apply to all that follow.
                guard index == 6 else { return member }
                var global = member
                global.header.block[156] = UInt8(ascii: "g")
                global.header.updateChecksum()
                return global
            }, to: "\(work)/in.tar")
        let outcome = try filter("\(work)/in.tar", "\(work)/out.tar")
        #expect(
            outcome.leftOut == [
                "./fifo (a FIFO)", "./null (a character device)", "./disk (a block device)",
                "PaxHeaders/x (a pax global header)",
            ])
        #expect(outcome.members == 6)
        let listed = try await listing("\(work)/out.tar")
        #expect(listed.map(\.1) == ["./", "./suid", "./sgid/", "./after", "./link -> after", "./hard link to ./after"])
        #expect(
            listed.map(\.0) == ["drwxrwxrwx", "-rwxr-xr-x", "drwxrwxrwx", "-rw-r--r--", "lrwxrwxrwx", "hrw-r--r--"])

        // Extracted as copyup does, into a destination that exists with a mode of its own.
        let destination = "\(work)/destination"
        #expect(mkdir(destination, 0o750) == 0)
        chmod(destination, 0o750)
        try await runner.check(
            Command(
                "tar",
                [
                    "--warning=none", "--directory", destination, "--extract", "--no-same-owner",
                    "--no-same-permissions", "--no-overwrite-dir", "-f", "\(work)/out.tar",
                ]))
        var info = stat()
        #expect(stat(destination, &info) == 0 && info.st_mode & 0o7777 == 0o750, "the destination's mode changed")
        #expect(stat("\(destination)/suid", &info) == 0 && info.st_mode & 0o7000 == 0, "setuid arrived")
        #expect(stat("\(destination)/sgid", &info) == 0 && info.st_mode & 0o7002 == 0, "setgid or o+w arrived")
        #expect(try String(contentsOfFile: "\(destination)/hard", encoding: .utf8) == "after")
        #expect(TestPaths.contents(of: destination).sorted() == ["after", "hard", "link", "sgid", "suid"])
    }

    @Test("the host's tar reads the members the filter checked: a pax size is honoured, a directory's data dropped")
    func reframes() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tarfilter.")
        defer { TestPaths.removeTree(work) }
        // A FIFO's header hidden as the data of a directory and as the data a regular file's
        // header announces where its pax size says 0 (tar reads it as the next member): tar
        // only sees the output, framed by the filter.
        let fifo = Member("./hidden-fifo", "6", mode: 0o666).header.block
        var directory = Member("./dir/", "5", mode: 0o755).header
        directory.setSize(512)
        directory.updateChecksum()
        var file = Member("./empty", "0", mode: 0o644).header
        file.setSize(512)
        file.updateChecksum()
        try write(
            [
                Member(header: directory, rawData: fifo),
                Member.pax([("size", "0")]),
                Member(header: file, rawData: []),
                Member(header: TarHeader(block: fifo), rawData: []),
                Member("./last", "0", data: "last"),
            ], to: "\(work)/in.tar")
        let outcome = try filter("\(work)/in.tar", "\(work)/out.tar")
        #expect(outcome.leftOut == ["./hidden-fifo (a FIFO)"])
        let listed = try await listing("\(work)/out.tar")
        #expect(listed.map(\.1) == ["./dir/", "./empty", "./last"])
        #expect(listed.map(\.0) == ["drwxr-xr-x", "-rw-r--r--", "-rw-r--r--"])
    }

    @Test("a GNU long name goes with its member: left out with a FIFO, kept with a file")
    func longNames() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tarfilter.")
        defer { TestPaths.removeTree(work) }
        let long = "./" + String(repeating: "n", count: 150)
        let longFifo = Member("././@LongLink", "L", data: long + "-fifo")
        let longFile = Member("././@LongLink", "L", data: long + "-file")
        try write(
            [
                longFifo, Member("./short-fifo", "6"),
                longFile, Member("./short-file", "0", data: "data"),
                Member("./plain", "0", data: "plain"),
            ], to: "\(work)/in.tar")
        let outcome = try filter("\(work)/in.tar", "\(work)/out.tar")
        #expect(outcome.leftOut == ["\(long)-fifo (a FIFO)"])
        #expect(try await listing("\(work)/out.tar").map(\.1) == ["\(long)-file", "./plain"])
    }

    @Test(
        "malformed pax records are clear errors, never crashes",
        arguments: [
            ("a record shorter than its own length field", "1 x"),
            ("a length past Int", "9999999999999999999 x=y\n"),
            ("a length past the data", "40 x=y\n"),
            ("a record without its newline", "6 x=yz"),
            ("a record without `=`", "5 xy\n"),
        ])
    func malformedPax(_ what: String, _ records: String) async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tarfilter.")
        defer { TestPaths.removeTree(work) }
        var pax = Member.pax([])
        pax.data = Array(records.utf8)
        pax.header.setSize(pax.data.count)
        pax.header.updateChecksum()
        try write([pax, Member("./file", "0", data: "x")], to: "\(work)/in.tar")
        #expect(throws: VirtError.self, "\(what)") { try filter("\(work)/in.tar", "\(work)/out.tar") }
    }

    @Test("a cut-off archive, a bad checksum, a negative or huge size and oversized metadata are refused")
    func refusals() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tarfilter.")
        defer { TestPaths.removeTree(work) }
        func refused(_ name: String, _ members: [Member], end: Bool = true, saying words: String) throws {
            try write(members, to: "\(work)/\(name).tar", end: end)
            do {
                _ = try filter("\(work)/\(name).tar", "\(work)/\(name).out")
                Issue.record("\(name): accepted")
            } catch {
                #expect(error.message.contains(words), "\(name): \(error.message)")
            }
        }
        try refused("cut", [Member("./file", "0", data: "x")], end: false, saying: "end-of-archive")

        var bad = Member("./file", "0", data: "x")
        bad.header.block[0] = UInt8(ascii: "y")
        try refused("checksum", [bad], saying: "checksum")

        var negative = Member("./file", "0").header
        negative.block.replaceSubrange(124..<136, with: [UInt8](repeating: 0xff, count: 12))
        negative.updateChecksum()
        try refused("negative", [Member(header: negative, rawData: [])], saying: "negative")

        var negativeOctal = Member("./file", "0").header
        negativeOctal.block.replaceSubrange(124..<136, with: Array("00000000-1 \u{0}".utf8))
        negativeOctal.updateChecksum()
        try refused("negative octal", [Member(header: negativeOctal, rawData: [])], saying: "invalid size")

        var huge = Member("./file", "0").header
        huge.block.replaceSubrange(124..<136, with: [0x80] + [UInt8](repeating: 0xff, count: 11))
        huge.updateChecksum()
        try refused("huge", [Member(header: huge, rawData: [])], saying: "too large")

        var bigName = Member("././@LongLink", "L")
        bigName.header.setSize(BlockReader.metadataLimit + 1)
        bigName.header.updateChecksum()
        try refused("metadata", [bigName], saying: "not metadata")
    }

    /// What lands on the host when the filter's output is extracted as copyup extracts it.
    func extracted(_ archive: String, into destination: String) async throws -> [String] {
        #expect(mkdir(destination, 0o755) == 0)
        _ = try await runner.run(
            Command(
                "tar",
                [
                    "--warning=none", "--directory", destination, "--extract", "--no-same-owner",
                    "--no-same-permissions", "--no-overwrite-dir", "-f", archive,
                ]))
        let found = try await runner.check(Command("find", [destination, "-mindepth", "1", "-printf", "%y %P\\n"]))
        return found.split(separator: "\n").map(String.init).sorted()
    }

    @Test("a file named `x/` lands as the directory tar makes of it, and its data is no member")
    func trailingSlash() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tarfilter.")
        defer { TestPaths.removeTree(work) }
        var fifo = Member("./smuggled-fifo", "6", mode: 0o666).header
        fifo.updateChecksum()
        let hidden = fifo.block + [UInt8](repeating: 0, count: 1024)
        var slashed = Member("./d/", "0").header
        slashed.setSize(hidden.count)
        slashed.updateChecksum()
        try write(
            [Member(header: slashed, rawData: hidden), Member("./after", "0", data: "after")], to: "\(work)/in.tar")
        let outcome = try filter("\(work)/in.tar", "\(work)/out.tar")
        #expect(outcome.leftOut.isEmpty)
        #expect(try await extracted("\(work)/out.tar", into: "\(work)/x") == ["d d", "f after"])
    }

    @Test("links out of the copied tree are left out: absolute or `..` symbolic links, `..` hard links")
    func linksOut() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-tarfilter.")
        defer { TestPaths.removeTree(work) }
        try write(
            [
                Member("./etc", "2", mode: 0o777, link: "/etc"),
                Member("./up", "2", mode: 0o777, link: "../../etc"),
                Member("./sub/", "5", mode: 0o755),
                Member("./sub/ok", "2", mode: 0o777, link: "file"),
                Member("./sub/file", "0", data: "data"),
                Member("./hard", "1", link: "./sub/../../x"),
            ], to: "\(work)/in.tar")
        let outcome = try filter("\(work)/in.tar", "\(work)/out.tar")
        #expect(
            outcome.leftOut == [
                "./etc (a symbolic link out of the copy, to /etc)",
                "./up (a symbolic link out of the copy, to ../../etc)",
                "./hard (a hard link out of the copy, to ./sub/../../x)",
            ])
        #expect(try await extracted("\(work)/out.tar", into: "\(work)/x") == ["d sub", "f sub/file", "l sub/ok"])
    }
}
