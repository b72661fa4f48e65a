import TarFormat
import VirtCore

/// Copies a root filesystem tarball into an Incus unified image tarball: every member moves
/// under `rootfs/`, hard links with it (symbolic links keep their targets), and everything
/// else (owners, modes, times, device numbers, xattrs in pax records) stays as it was.
///
/// Streams the archive once without unpacking it, so it needs no root privileges and keeps
/// what an unprivileged extraction would lose. Along the way it notes what the import checks:
/// which of a few paths exist, /etc/os-release, and the first bytes of an executable (for the
/// architecture).
struct RootfsRewriter {
    /// Paths (relative, without `./`) whose presence the caller wants to know about.
    var watchedPaths: Set<String>
    /// Regular files whose first bytes to keep (up to `capturedLength`).
    var capturedFiles: Set<String>
    var capturedLength = 4096

    struct Findings {
        var presentPaths: Set<String> = []
        var captured: [String: [UInt8]] = [:]
        var members = 0
        /// Members' mtime, for the members the import adds.
        var newestTime = 0
    }

    static let prefix = "rootfs/"

    /// The member name inside the rootfs, without `./` or `/` in front ("" for the root).
    static func relative(_ name: String) -> String {
        var path = Substring(name)
        while true {
            if path.hasPrefix("./") {
                path = path.dropFirst(2)
            } else if path.hasPrefix("/") {
                path = path.dropFirst()
            } else {
                break
            }
        }
        if path == "." { return "" }
        return String(path)
    }

    func rewrite(_ reader: BlockReader, into writer: BlockWriter) throws(VirtError) -> Findings {
        var findings = Findings()
        var pax = PaxRecords()
        var longName: String?
        var longLink: String?
        while true {
            let block = try reader.read(512)
            guard block.count == 512 else {
                throw VirtError(.io, "\(reader.path) is truncated: it ends without the end-of-archive blocks")
            }
            var header = TarHeader(block: block)
            if header.isZero { break }
            guard header.checksumIsValid else {
                throw VirtError(.io, "\(reader.path) is not a valid tar archive (bad header checksum)")
            }
            var size = try header.size()
            switch header.type {
            case UInt8(ascii: "x"):
                pax = try Self.records(try reader.metadata(size, refusedAs: .badImage), in: reader.path)
                continue
            case UInt8(ascii: "L"), UInt8(ascii: "K"):
                let data = try reader.metadata(size, refusedAs: .badImage)
                let text = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
                if header.type == UInt8(ascii: "L") { longName = text } else { longLink = text }
                continue
            case UInt8(ascii: "g"):
                let data = try reader.metadata(size, refusedAs: .badImage)
                // A global path or linkpath would rename every member after it, past the checks.
                let global = try Self.records(data, in: reader.path)
                if global["path"] != nil || global["linkpath"] != nil || global["size"] != nil {
                    throw VirtError(
                        .badImage, "\(reader.path) has a pax global header that sets every member's path or size")
                }
                try writer.writeMember(header, data: data)
                continue
            case UInt8(ascii: "S"), UInt8(ascii: "M"), UInt8(ascii: "V"):
                throw VirtError(.io, "\(reader.path) holds GNU sparse or multi-volume members, which are not supported")
            default:
                break
            }
            if let paxSize = pax["size"] {
                guard let value = Int(paxSize), value >= 0, value < 1 << 60 else {
                    throw VirtError(.badImage, "\(reader.path) has a pax size record that is no size: \(paxSize)")
                }
                size = value
            }
            let name = Self.relative(pax["path"] ?? longName ?? header.fullName)
            let isHardLink = header.type == UInt8(ascii: "1")
            let link = pax["linkpath"] ?? longLink ?? header.linkName
            try Self.check(name: name, link: link, type: header.type, in: reader.path)
            let newName = Self.prefix + name
            let newLink = isHardLink ? Self.prefix + Self.relative(link) : link
            findings.members += 1
            let trimmed = name.hasSuffix("/") ? String(name.dropLast()) : name
            if watchedPaths.contains(trimmed) { findings.presentPaths.insert(trimmed) }

            // Framing is this code's, not the input's: members without data get size 0 and their
            // declared data is skipped, a file named `x/` becomes the directory tar makes of it,
            // and the size is in the header only, so that the consumer's tar reads exactly the
            // members checked here.
            if Self.isRegular(header.type) && name.hasSuffix("/") { header.block[156] = UInt8(ascii: "5") }
            let hasData = Self.isRegular(header.type)
            var records = pax
            records["size"] = nil
            if pax["path"] != nil || newName.utf8.count > 100 { records["path"] = newName }
            if pax["linkpath"] != nil || newLink.utf8.count > 100 { records["linkpath"] = newLink }
            if let sparseName = pax["GNU.sparse.name"] {
                records["GNU.sparse.name"] = Self.prefix + Self.relative(sparseName)
            }
            let mtime =
                Int(String(decoding: header.block[136..<148].prefix { $0 != 0 && $0 != 0x20 }, as: UTF8.self), radix: 8)
                ?? 0
            findings.newestTime = max(findings.newestTime, mtime)
            if !records.isEmpty { try writer.writePax(records, mtime: mtime) }
            header.setString(0, 100, newName)
            if header.isPOSIX { header.setString(345, 155, "") }
            header.setString(157, 100, newLink)
            header.setSize(hasData ? size : 0)
            header.updateChecksum()
            try writer.write(header.block)

            if !hasData {
                try reader.stream(size + (512 - size % 512) % 512) { _ in }
            } else if size > 0 {
                let capture = capturedFiles.contains(name) && findings.captured[name] == nil
                var kept: [UInt8] = []
                try reader.stream(size) { (piece) throws(VirtError) in
                    if capture && kept.count < capturedLength { kept += piece.prefix(capturedLength - kept.count) }
                    try writer.write(piece)
                }
                if capture { findings.captured[name] = kept }
                let padding = (512 - size % 512) % 512
                try writer.write(try reader.read(padding))
            }
            pax = PaxRecords()
            longName = nil
            longLink = nil
        }
        return findings
    }
}

extension RootfsRewriter {
    /// Regular files (`0`, NUL, contiguous `7`): the only members whose data tar reads.
    static func isRegular(_ type: UInt8) -> Bool {
        type == UInt8(ascii: "0") || type == 0 || type == UInt8(ascii: "7")
    }

    /// pax records; malformed ones make the archive a bad image.
    static func records(_ data: [UInt8], in path: String) throws(VirtError) -> PaxRecords {
        do {
            return try PaxRecords(parsing: data)
        } catch {
            throw VirtError(.badImage, "\(path): \(error.message)")
        }
    }

    /// Refuses what no root file system holds and what would reach outside it wherever the
    /// archive is unpacked: a `..` in a member's name or a hard link's target, and an absolute
    /// symbolic link target that climbs above `/`. Relative symbolic links with more `..` than
    /// their depth are left alone: real packages ship them (lintian's
    /// symlink-has-too-many-up-segments), and they resolve to `/` inside the container.
    static func check(name: String, link: String, type: UInt8, in path: String) throws(VirtError) {
        func hasParent(_ text: String) -> Bool { text.split(separator: "/").contains("..") }
        if hasParent(name) {
            throw VirtError(.badImage, "\(path) has a member whose name has a `..` component: \(name)")
        }
        if type == UInt8(ascii: "1") && hasParent(link) {
            throw VirtError(.badImage, "\(path) has a hard link to a path with a `..` component: \(name) -> \(link)")
        }
        if type == UInt8(ascii: "2") && link.hasPrefix("/") {
            var depth = 0
            for component in link.split(separator: "/") where component != "." {
                depth += component == ".." ? -1 : 1
                if depth < 0 {
                    throw VirtError(
                        .badImage, "\(path) has a symbolic link whose target climbs above /: \(name) -> \(link)")
                }
            }
        }
    }
}
