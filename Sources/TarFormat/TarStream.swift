import VirtCore

/// Reads a file in large blocks; the tar code asks for exact byte counts.
package final class BlockReader {
    private let fd: Int32
    private var buffer: [UInt8]
    private var start = 0
    private var end = 0
    /// What error messages call the input: its path, or what a pipe carries.
    package let path: String

    package init(path: String, bufferSize: Int = 1 << 20) throws(VirtError) {
        fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw VirtError.io("cannot open \(path)") }
        buffer = [UInt8](repeating: 0, count: bufferSize)
        self.path = path
    }

    /// Reads `fd`, which it owns from now on (a pipe, say), under the name `name`.
    package init(fd: Int32, name: String, bufferSize: Int = 1 << 20) {
        self.fd = fd
        buffer = [UInt8](repeating: 0, count: bufferSize)
        path = name
    }

    deinit { Glibc.close(fd) }

    /// Exactly `count` bytes, or fewer only at the end of the file.
    package func read(_ count: Int) throws(VirtError) -> [UInt8] {
        var result: [UInt8] = []
        result.reserveCapacity(count)
        while result.count < count {
            if start == end {
                guard try fill() else { break }
            }
            let take = min(count - result.count, end - start)
            result.append(contentsOf: buffer[start..<(start + take)])
            start += take
        }
        return result
    }

    /// Hands `count` bytes to `body` in pieces, without collecting them.
    package func stream(_ count: Int, _ body: (ArraySlice<UInt8>) throws(VirtError) -> Void) throws(VirtError) {
        var left = count
        while left > 0 {
            if start == end {
                guard try fill() else { throw VirtError(.io, "\(path) ends in the middle of a member") }
            }
            let take = min(left, end - start)
            try body(buffer[start..<(start + take)])
            start += take
            left -= take
        }
    }

    private func fill() throws(VirtError) -> Bool {
        while true {
            let got = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if got < 0 {
                if errno == EINTR { continue }
                throw VirtError.io("cannot read \(path)")
            }
            start = 0
            end = got
            return got > 0
        }
    }
}

/// What both readers of untrusted archives need: metadata members read whole but bounded.
extension BlockReader {
    /// A pax header or GNU long name larger than this is not metadata.
    package static let metadataLimit = 1 << 20

    /// A metadata member's `size` bytes and its padding; an error of `code` past
    /// ``metadataLimit``, an I/O error when the input ends first.
    package func metadata(_ size: Int, refusedAs code: VirtError.Code) throws(VirtError) -> [UInt8] {
        guard size <= Self.metadataLimit else {
            throw VirtError(code, "\(path) has a tar metadata member of \(size) bytes, not metadata")
        }
        let data = try read(size)
        guard data.count == size else { throw VirtError(.io, "\(path) ends in the middle of a member") }
        try skipPadding(size)
        return data
    }

    /// Reads past the zeros that fill a member of `size` bytes to its last block.
    package func skipPadding(_ size: Int) throws(VirtError) {
        _ = try read((512 - size % 512) % 512)
    }
}

/// Writes a file through a large buffer.
package final class BlockWriter {
    private let fd: Int32
    private var buffer: [UInt8] = []
    package let path: String

    package init(path: String) throws(VirtError) {
        fd = Glibc.open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw VirtError.io("cannot create \(path)") }
        self.path = path
        buffer.reserveCapacity(1 << 20)
    }

    /// Writes to `fd`, which it owns from now on, under the name `name`.
    package init(fd: Int32, name: String) {
        self.fd = fd
        path = name
        buffer.reserveCapacity(1 << 20)
    }

    deinit { Glibc.close(fd) }

    package func write<C: Collection>(_ bytes: C) throws(VirtError) where C.Element == UInt8 {
        buffer.append(contentsOf: bytes)
        if buffer.count >= 1 << 20 { try flush() }
    }

    package func flush() throws(VirtError) {
        try writeAll(fd, buffer, "cannot write \(path)")
        buffer.removeAll(keepingCapacity: true)
    }
}

extension VirtError {
    /// An I/O error with errno's text.
    package static func io(_ what: String) -> VirtError {
        VirtError(.io, what, errno: errno)
    }
}

/// One tar header block, and the fields this code reads or writes.
package struct TarHeader {
    package var block: [UInt8]

    package init(block: [UInt8]) { self.block = block }

    /// A fresh POSIX ustar header.
    package init(name: String, type: UInt8, mode: Int, size: Int, linkName: String = "", mtime: Int) {
        block = [UInt8](repeating: 0, count: 512)
        setString(0, 100, name)
        setOctal(100, 8, mode)
        setOctal(108, 8, 0)
        setOctal(116, 8, 0)
        setOctal(124, 12, size)
        setOctal(136, 12, mtime)
        block[156] = type
        setString(157, 100, linkName)
        block.replaceSubrange(257..<265, with: Array("ustar\u{0}00".utf8))
        setString(265, 32, "root")
        setString(297, 32, "root")
        updateChecksum()
    }

    package var isZero: Bool { block.allSatisfy { $0 == 0 } }
    package var type: UInt8 { block[156] }
    package var isPOSIX: Bool { Array(block[257..<263]) == Array("ustar\u{0}".utf8) }

    package var name: String { string(0, 100) }
    package var linkName: String { string(157, 100) }
    package var prefix: String { isPOSIX ? string(345, 155) : "" }

    /// The full name from the header alone (ustar prefix + name).
    package var fullName: String {
        let prefix = self.prefix
        return prefix.isEmpty ? name : prefix + "/" + name
    }

    package func size() throws(VirtError) -> Int {
        let field = block[124..<136]
        if let first = field.first, first & 0x80 != 0 {
            // Base-256, for members of 8 GiB and more.
            // Negative sizes (0xff first) and sizes past Int are no member's.
            guard first & 0x40 == 0 else { throw VirtError(.io, "a tar header has a negative size") }
            var value = Int(first & 0x7f)
            for byte in field.dropFirst() {
                let (shifted, overflow) = value.multipliedReportingOverflow(by: 256)
                guard !overflow else { throw VirtError(.io, "a tar header's size is too large") }
                value = shifted | Int(byte)
            }
            return value
        }
        let text = String(decoding: field.drop { $0 == 0x20 }.prefix { $0 != 0 && $0 != 0x20 }, as: UTF8.self)
        // Octal digits only: Int() would take a sign ("-1"), and a negative size moves every
        // member after it.
        guard text.allSatisfy({ ("0"..."7").contains($0) }), let value = Int(text.isEmpty ? "0" : text, radix: 8)
        else {
            throw VirtError(.io, "a tar header has an invalid size field")
        }
        return value
    }

    package var checksumIsValid: Bool {
        let stored = String(
            decoding: block[148..<156].prefix { $0 != 0 && $0 != 0x20 }.drop { $0 == 0x20 }, as: UTF8.self)
        guard let value = Int(stored, radix: 8) else { return false }
        return value == computedChecksum
    }

    private var computedChecksum: Int {
        var sum = 0
        for (index, byte) in block.enumerated() { sum += (148..<156).contains(index) ? 0x20 : Int(byte) }
        return sum
    }

    package mutating func updateChecksum() {
        let text = String(computedChecksum, radix: 8)
        let padded = String(repeating: "0", count: max(0, 6 - text.count)) + text
        block.replaceSubrange(148..<156, with: Array(padded.utf8) + [0, 0x20])
    }

    package mutating func setString(_ offset: Int, _ length: Int, _ value: String) {
        let bytes = Array(value.utf8.prefix(length))
        block.replaceSubrange(
            offset..<(offset + length), with: bytes + [UInt8](repeating: 0, count: length - bytes.count))
    }

    /// The size field: octal while it fits (under 8 GiB), GNU base-256 past that.
    package mutating func setSize(_ value: Int) {
        if value < 0o77777777777 {
            setOctal(124, 12, value)
            return
        }
        var bytes = [UInt8](repeating: 0, count: 12)
        var rest = value
        for index in stride(from: 11, to: 0, by: -1) {
            bytes[index] = UInt8(rest & 0xff)
            rest >>= 8
        }
        bytes[0] = 0x80
        block.replaceSubrange(124..<136, with: bytes)
    }

    /// The mode field as a number (0 when it does not parse).
    package var mode: Int {
        Int(
            String(decoding: block[100..<108].prefix { $0 != 0 && $0 != 0x20 }.drop { $0 == 0x20 }, as: UTF8.self),
            radix: 8) ?? 0
    }

    package mutating func setOctal(_ offset: Int, _ length: Int, _ value: Int) {
        let text = String(value, radix: 8)
        let padded = String(repeating: "0", count: max(0, length - 1 - text.count)) + text
        block.replaceSubrange(offset..<(offset + length), with: Array(padded.utf8) + [0])
    }

    private func string(_ offset: Int, _ length: Int) -> String {
        String(decoding: block[offset..<(offset + length)].prefix { $0 != 0 }, as: UTF8.self)
    }
}

/// pax extended header records (`LEN key=value\n`), in their order.
package struct PaxRecords {
    package var records: [(key: String, value: [UInt8])] = []

    package init() {}

    package init(parsing data: [UInt8]) throws(VirtError) {
        var index = 0
        while index < data.count {
            // A record is `LEN key=value\n` and LEN counts all of it: anything shorter than its
            // own prefix, longer than what is left, or not ending in a newline is malformed.
            guard let space = data[index...].prefix(20).firstIndex(of: 0x20),
                let length = Int(String(decoding: data[index..<space], as: UTF8.self)),
                length > space - index + 2, length <= data.count - index,
                data[index + length - 1] == 0x0A
            else { throw VirtError(.io, "a pax extended header is malformed") }
            let record = data[(space + 1)..<(index + length - 1)]
            guard let equals = record.firstIndex(of: 0x3D) else {
                throw VirtError(.io, "a pax extended header record has no `='")
            }
            records.append((String(decoding: record[..<equals], as: UTF8.self), Array(record[(equals + 1)...])))
            index += length
        }
    }

    package subscript(key: String) -> String? {
        get { records.last { $0.key == key }.map { String(decoding: $0.value, as: UTF8.self) } }
        set {
            records.removeAll { $0.key == key }
            if let newValue { records.append((key, Array(newValue.utf8))) }
        }
    }

    package var isEmpty: Bool { records.isEmpty }

    /// A record's value as tar uses it: a C string, up to its first NUL.
    package func cString(_ key: String) -> String? {
        records.last { $0.key == key }.map { String(decoding: $0.value.prefix { $0 != 0 }, as: UTF8.self) }
    }

    package func encoded() -> [UInt8] {
        var data: [UInt8] = []
        for (key, value) in records {
            let body = 1 + key.utf8.count + 1 + value.count + 1  // " key=value\n"
            var length = body + 1
            while String(length).count + body != length { length = String(length).count + body }
            data += Array(String(length).utf8) + [0x20] + Array(key.utf8) + [0x3D] + value + [0x0A]
        }
        return data
    }
}

/// What a tar writer needs to add members of its own.
extension BlockWriter {
    package func writeMember(_ header: TarHeader, data: [UInt8] = []) throws(VirtError) {
        try write(header.block)
        try write(data)
        try write([UInt8](repeating: 0, count: (512 - data.count % 512) % 512))
    }

    package func writePax(_ records: PaxRecords, mtime: Int) throws(VirtError) {
        let data = records.encoded()
        // The member's own name is in the records; this one is only what old tars extract.
        try writeMember(
            TarHeader(name: "PaxHeaders/member", type: UInt8(ascii: "x"), mode: 0o644, size: data.count, mtime: mtime),
            data: data)
    }
}
