import VirtCore

// A small RFC 8259 parser and writer. Foundation's JSONSerialization would do, but it maps numbers
// and booleans through NSNumber (true and 1 become indistinguishable on Linux) and pulls
// Foundation into every server for one feature.

extension JSONValue {
    /// Parses one JSON text (surrounding whitespace allowed); anything else is a
    /// ``VirtError/Code/testbedFailure``, since the text always comes from QEMU or the guest.
    public init(parsing bytes: some Collection<UInt8>) throws(VirtError) {
        let array = Array(bytes)
        let parsed = array.withUnsafeBufferPointer { buffer -> Result<JSONValue, JSONParser.Failure> in
            var parser = JSONParser(buffer)
            return Result { () throws(JSONParser.Failure) -> JSONValue in try parser.parseDocument() }
        }
        switch parsed {
        case .success(let value): self = value
        case .failure(let failure):
            throw VirtError(.testbedFailure, "invalid JSON (\(failure.reason) at byte \(failure.offset))")
        }
    }

    /// Parses JSON text.
    public init(parsing text: String) throws(VirtError) {
        try self.init(parsing: Array(text.utf8))
    }

    /// The compact JSON text, object members sorted by key so output is reproducible.
    public var serialized: String {
        String(decoding: serializedBytes, as: UTF8.self)
    }

    /// The compact JSON text as UTF-8.
    public var serializedBytes: [UInt8] {
        var output: [UInt8] = []
        JSONWriter.write(self, into: &output)
        return output
    }
}

private enum JSONWriter {
    static func write(_ value: JSONValue, into output: inout [UInt8]) {
        switch value {
        case .null: output.append(contentsOf: "null".utf8)
        case .bool(let flag): output.append(contentsOf: (flag ? "true" : "false").utf8)
        case .number(let number): writeNumber(number, into: &output)
        case .string(let text): writeString(text, into: &output)
        case .array(let elements):
            output.append(UInt8(ascii: "["))
            for (index, element) in elements.enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                write(element, into: &output)
            }
            output.append(UInt8(ascii: "]"))
        case .object(let members):
            output.append(UInt8(ascii: "{"))
            for (index, key) in members.keys.sorted().enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                writeString(key, into: &output)
                output.append(UInt8(ascii: ":"))
                if let member = members[key] { write(member, into: &output) }
            }
            output.append(UInt8(ascii: "}"))
        }
    }

    static func writeNumber(_ number: Double, into output: inout [UInt8]) {
        // JSON has no NaN or infinity; null is what JavaScript's JSON.stringify writes too.
        guard number.isFinite else {
            output.append(contentsOf: "null".utf8)
            return
        }
        if let integer = Int64(exactly: number), integer.magnitude <= 1 << 53 {
            output.append(contentsOf: String(integer).utf8)
        } else {
            // Swift's shortest round-trip form ("1.5", "1e-07", "1e+30") is valid JSON.
            output.append(contentsOf: number.description.utf8)
        }
    }

    static func writeString(_ text: String, into output: inout [UInt8]) {
        output.append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "\""): output.append(contentsOf: #"\""#.utf8)
            case UInt8(ascii: "\\"): output.append(contentsOf: #"\\"#.utf8)
            case 0x0A: output.append(contentsOf: #"\n"#.utf8)
            case 0x0D: output.append(contentsOf: #"\r"#.utf8)
            case 0x09: output.append(contentsOf: #"\t"#.utf8)
            case 0x00..<0x20:
                output.append(contentsOf: #"\u00"#.utf8)
                output.append(hexDigit(byte >> 4))
                output.append(hexDigit(byte & 0x0F))
            default: output.append(byte)
            }
        }
        output.append(UInt8(ascii: "\""))
    }

    static func hexDigit(_ value: UInt8) -> UInt8 {
        value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "a") + value - 10
    }
}

/// A recursive-descent parser over UTF-8 bytes.
private struct JSONParser {
    struct Failure: Error {
        var reason: String
        var offset: Int
    }

    /// Deep enough for anything QEMU sends, shallow enough that hostile input cannot overflow the stack.
    static let maximumDepth = 256

    let bytes: UnsafeBufferPointer<UInt8>
    var position = 0
    var depth = 0

    init(_ bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
    }

    mutating func parseDocument() throws(Failure) -> JSONValue {
        let value = try parseValue()
        skipWhitespace()
        guard position == bytes.count else { throw fail("trailing characters") }
        return value
    }

    func fail(_ reason: String) -> Failure {
        Failure(reason: reason, offset: position)
    }

    var current: UInt8? { position < bytes.count ? bytes[position] : nil }

    mutating func skipWhitespace() {
        while let byte = current, byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 {
            position += 1
        }
    }

    mutating func expect(_ byte: UInt8) throws(Failure) {
        guard current == byte else { throw fail("expected '\(Character(Unicode.Scalar(byte)))'") }
        position += 1
    }

    mutating func parseValue() throws(Failure) -> JSONValue {
        skipWhitespace()
        guard let byte = current else { throw fail("unexpected end of input") }
        switch byte {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): return try parseLiteral("true", .bool(true))
        case UInt8(ascii: "f"): return try parseLiteral("false", .bool(false))
        case UInt8(ascii: "n"): return try parseLiteral("null", .null)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        default: throw fail("unexpected character")
        }
    }

    mutating func parseLiteral(_ word: StaticString, _ value: JSONValue) throws(Failure) -> JSONValue {
        let count = word.utf8CodeUnitCount
        guard bytes.count - position >= count else { throw fail("unexpected end of input") }
        for index in 0..<count where bytes[position + index] != word.utf8Start[index] {
            throw fail("invalid literal")
        }
        position += count
        return value
    }

    mutating func enterContainer() throws(Failure) {
        depth += 1
        guard depth <= Self.maximumDepth else { throw fail("nested too deeply") }
    }

    mutating func parseObject() throws(Failure) -> JSONValue {
        try enterContainer()
        defer { depth -= 1 }
        position += 1
        var members: [String: JSONValue] = [:]
        skipWhitespace()
        if current == UInt8(ascii: "}") {
            position += 1
            return .object(members)
        }
        while true {
            skipWhitespace()
            guard current == UInt8(ascii: "\"") else { throw fail("expected a member name") }
            let key = try parseString()
            skipWhitespace()
            try expect(UInt8(ascii: ":"))
            members[key] = try parseValue()
            skipWhitespace()
            if current == UInt8(ascii: ",") {
                position += 1
                continue
            }
            try expect(UInt8(ascii: "}"))
            return .object(members)
        }
    }

    mutating func parseArray() throws(Failure) -> JSONValue {
        try enterContainer()
        defer { depth -= 1 }
        position += 1
        var elements: [JSONValue] = []
        skipWhitespace()
        if current == UInt8(ascii: "]") {
            position += 1
            return .array(elements)
        }
        while true {
            elements.append(try parseValue())
            skipWhitespace()
            if current == UInt8(ascii: ",") {
                position += 1
                continue
            }
            try expect(UInt8(ascii: "]"))
            return .array(elements)
        }
    }

    mutating func parseNumber() throws(Failure) -> JSONValue {
        let start = position
        if current == UInt8(ascii: "-") { position += 1 }
        if current == UInt8(ascii: "0") {
            position += 1
        } else {
            guard try skipDigits() > 0 else { throw fail("invalid number") }
        }
        if current == UInt8(ascii: ".") {
            position += 1
            guard try skipDigits() > 0 else { throw fail("invalid number") }
        }
        if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
            position += 1
            if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { position += 1 }
            guard try skipDigits() > 0 else { throw fail("invalid number") }
        }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
        guard let number = Double(text) else { throw fail("invalid number") }
        return .number(number)
    }

    mutating func skipDigits() throws(Failure) -> Int {
        let start = position
        while let byte = current, byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") { position += 1 }
        return position - start
    }

    mutating func parseString() throws(Failure) -> String {
        position += 1
        var scalars: [UInt8] = []
        while true {
            // Copy runs of plain bytes in one go: base64 payloads are megabytes long.
            let runStart = position
            while let byte = current, byte != UInt8(ascii: "\""), byte != UInt8(ascii: "\\"), byte >= 0x20 {
                position += 1
            }
            if position > runStart && scalars.isEmpty, current == UInt8(ascii: "\"") {
                let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[runStart..<position]), as: UTF8.self)
                position += 1
                return text
            }
            scalars.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[runStart..<position]))
            guard let byte = current else { throw fail("unterminated string") }
            switch byte {
            case UInt8(ascii: "\""):
                position += 1
                return String(decoding: scalars, as: UTF8.self)
            case UInt8(ascii: "\\"):
                position += 1
                try parseEscape(into: &scalars)
            default:
                throw fail("control character in string")
            }
        }
    }

    mutating func parseEscape(into output: inout [UInt8]) throws(Failure) {
        guard let byte = current else { throw fail("unterminated string") }
        position += 1
        switch byte {
        case UInt8(ascii: "\""): output.append(UInt8(ascii: "\""))
        case UInt8(ascii: "\\"): output.append(UInt8(ascii: "\\"))
        case UInt8(ascii: "/"): output.append(UInt8(ascii: "/"))
        case UInt8(ascii: "b"): output.append(0x08)
        case UInt8(ascii: "f"): output.append(0x0C)
        case UInt8(ascii: "n"): output.append(0x0A)
        case UInt8(ascii: "r"): output.append(0x0D)
        case UInt8(ascii: "t"): output.append(0x09)
        case UInt8(ascii: "u"):
            let first = try parseHex4()
            var scalar = Unicode.Scalar(first)
            if (0xD800..<0xDC00).contains(first), bytes.count - position >= 6,
                bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u")
            {
                let saved = position
                position += 2
                let second = try parseHex4()
                if (0xDC00..<0xE000).contains(second) {
                    scalar = Unicode.Scalar(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00))
                } else {
                    position = saved
                }
            }
            // A lone surrogate cannot be represented in a String: U+FFFD, as QEMU itself does.
            output.append(contentsOf: String(Character(scalar ?? "\u{FFFD}")).utf8)
        default:
            throw fail("invalid escape")
        }
    }

    mutating func parseHex4() throws(Failure) -> UInt32 {
        guard bytes.count - position >= 4 else { throw fail("truncated \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[position]
            let digit: UInt32
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(byte - UInt8(ascii: "A") + 10)
            default: throw fail("invalid \\u escape")
            }
            value = value << 4 | digit
            position += 1
        }
        return value
    }
}
