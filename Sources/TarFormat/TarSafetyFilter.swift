import VirtCore

/// Stands between a tar stream that a testbed wrote and the host's `tar --extract`, which runs
/// as the server's user (often root): only what is safe for that user to create on the host
/// goes on.
///
/// The testbed is not trusted (a test runs as root there and can replace its `tar`), so a
/// `copyup` of a directory must not plant setuid programs, device nodes or FIFOs on the host.
/// What passes:
/// - regular files, directories, symbolic and hard links, with their mode cut to the
///   permission bits (no setuid, setgid or sticky bit);
/// - their pax records and GNU long names, except a pax `size`, which goes into the header.
///
/// What is left out, with its data: device nodes, FIFOs, pax global headers, sparse and
/// multi-volume members, any type tar knows no meaning for here, and links that point out of
/// the copied tree (a symbolic link with an absolute target or a `..`, a hard link with a
/// `..`). Each is named in ``Outcome/leftOut``. A file whose name ends in `/` goes on as the
/// directory tar would make of it.
///
/// The output is re-framed rather than copied: every member's header says exactly how much
/// data follows it, and members without data have size 0, so the host's tar reads the members
/// this filter checked and nothing else, whatever the input's framing tricks (a pax `size` on a
/// directory, padding that is not zeros).
package struct TarSafetyFilter {
    /// What the filter left out: one entry per member, "NAME (what it was)".
    package struct Outcome: Sendable, Equatable {
        package var leftOut: [String] = []
        package var members = 0
    }

    package init() {}

    package func filter(_ reader: BlockReader, into writer: BlockWriter) throws(VirtError) -> Outcome {
        var outcome = Outcome()
        var pax = PaxRecords()
        var longName: [UInt8]?
        var longLink: [UInt8]?
        while true {
            let block = try reader.read(512)
            guard block.count == 512 else {
                throw VirtError(.io, "\(reader.path) ends without the end-of-archive blocks")
            }
            var header = TarHeader(block: block)
            if header.isZero {
                try writer.write([UInt8](repeating: 0, count: 1024))
                try writer.flush()
                return outcome
            }
            guard header.checksumIsValid else {
                throw VirtError(.io, "\(reader.path) is not a valid tar archive (bad header checksum)")
            }
            let size = try header.size()
            switch header.type {
            case UInt8(ascii: "x"):
                // Later records win, as in tar; values stay bytes (a path need not be UTF-8).
                for record in try PaxRecords(parsing: try reader.metadata(size, refusedAs: .io)).records {
                    pax.records.removeAll { $0.key == record.key }
                    pax.records.append(record)
                }
                continue
            case UInt8(ascii: "L"):
                longName = try reader.metadata(size, refusedAs: .io)
                continue
            case UInt8(ascii: "K"):
                longLink = try reader.metadata(size, refusedAs: .io)
                continue
            default:
                break
            }

            var dataSize = size
            if let text = pax["size"] {
                guard let value = Int(text), value >= 0 else {
                    throw VirtError(.io, "\(reader.path): a pax size record is not a size: \(text)")
                }
                dataSize = value
            }
            guard dataSize < 1 << 60 else {
                throw VirtError(.io, "\(reader.path): a member of \(dataSize) bytes is no file a testbed has")
            }
            let name =
                pax.cString("path") ?? longName.map { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                ?? header.fullName
            let link =
                pax.cString("linkpath") ?? longLink.map { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                ?? header.linkName
            var kind = Self.kind(of: header.type)
            if kind == .regular && name.hasSuffix("/") {
                // GNU tar makes a directory of a file whose name ends in `/`, and then does not
                // skip its data: it goes on as a directory, without data, or its data would be
                // read as members.
                kind = .withoutData
                header.block[156] = UInt8(ascii: "5")
            }
            if header.type == UInt8(ascii: "2") && (link.hasPrefix("/") || Self.hasParent(link)) {
                // tar guards against such links only within one run: a later copyup into the
                // same directory (autopkgtest's artifacts/) would write through this one.
                kind = .leftOut("a symbolic link out of the copy, to \(link)")
            }
            if header.type == UInt8(ascii: "1") && Self.hasParent(link) {
                kind = .leftOut("a hard link out of the copy, to \(link)")
            }
            let sparse = pax.records.contains { $0.key.hasPrefix("GNU.sparse.") }
            if case .leftOut(let what) = kind {
                outcome.leftOut.append("\(name) (\(what))")
                try skip(reader, dataSize)
            } else if sparse {
                outcome.leftOut.append("\(name) (a sparse file)")
                try skip(reader, dataSize)
            } else {
                outcome.members += 1
                var records = pax
                records["size"] = nil
                if !records.isEmpty { try writer.writePax(records, mtime: 0) }
                if let longLink { try writer.writeMember(Self.longHeader(UInt8(ascii: "K"), longLink), data: longLink) }
                if let longName { try writer.writeMember(Self.longHeader(UInt8(ascii: "L"), longName), data: longName) }
                let hasData = kind == .regular
                header.setOctal(100, 8, header.mode & 0o777)
                header.setSize(hasData ? dataSize : 0)
                header.updateChecksum()
                try writer.write(header.block)
                if hasData {
                    try reader.stream(dataSize) { (piece) throws(VirtError) in try writer.write(piece) }
                    _ = try reader.read(Self.padding(dataSize))
                    try writer.write([UInt8](repeating: 0, count: Self.padding(dataSize)))
                } else {
                    try skip(reader, dataSize)
                }
            }
            pax = PaxRecords()
            longName = nil
            longLink = nil
        }
    }

    enum Kind: Equatable {
        case regular
        case withoutData
        case leftOut(String)
    }

    static func kind(of type: UInt8) -> Kind {
        switch type {
        case 0, UInt8(ascii: "0"), UInt8(ascii: "7"): .regular
        case UInt8(ascii: "1"), UInt8(ascii: "2"), UInt8(ascii: "5"): .withoutData
        case UInt8(ascii: "3"): .leftOut("a character device")
        case UInt8(ascii: "4"): .leftOut("a block device")
        case UInt8(ascii: "6"): .leftOut("a FIFO")
        case UInt8(ascii: "g"): .leftOut("a pax global header")
        case UInt8(ascii: "S"): .leftOut("a GNU sparse file")
        case UInt8(ascii: "M"), UInt8(ascii: "V"): .leftOut("a multi-volume header")
        default: .leftOut("a member of tar type \(String(decoding: [type], as: UTF8.self).debugDescription)")
        }
    }

    static func padding(_ size: Int) -> Int { (512 - size % 512) % 512 }

    static func hasParent(_ path: String) -> Bool { path.split(separator: "/").contains("..") }

    static func longHeader(_ type: UInt8, _ data: [UInt8]) -> TarHeader {
        TarHeader(name: "././@LongLink", type: type, mode: 0, size: data.count, mtime: 0)
    }

    private func skip(_ reader: BlockReader, _ size: Int, padding: Int? = nil) throws(VirtError) {
        try reader.stream(size + (padding ?? Self.padding(size))) { _ in }
    }
}
