/// Percent-encoding as autopkgtest's clients and servers use it (Python's `urllib.parse`).
public enum PercentCoding {
    /// Decodes `%XX` escapes like Python's `unquote`: an escape that is not two hex digits stays
    /// as it is, and bytes that are not valid UTF-8 become U+FFFD.
    public static func decode<Bytes: Collection>(_ word: Bytes) -> String where Bytes.Element == UInt8 {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(word.count)
        var index = word.startIndex
        while index != word.endIndex {
            let byte = word[index]
            if byte == UInt8(ascii: "%") {
                let first = word.index(after: index)
                if first != word.endIndex {
                    let second = word.index(after: first)
                    if second != word.endIndex, let high = hexValue(word[first]), let low = hexValue(word[second]) {
                        bytes.append(high << 4 | low)
                        index = word.index(after: second)
                        continue
                    }
                }
            }
            bytes.append(byte)
            index = word.index(after: index)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Encodes like Python's `quote(text, safe='/')`: letters, digits, `_.-~` and `/` stay,
    /// every other UTF-8 byte becomes `%XX` with upper-case hex.
    public static func encode(_ text: String) -> String {
        var result = ""
        result.reserveCapacity(text.utf8.count)
        for byte in text.utf8 {
            if isUnreserved(byte) {
                result.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                result += "%"
                result.unicodeScalars.append(Unicode.Scalar(hexDigits[Int(byte >> 4)]))
                result.unicodeScalars.append(Unicode.Scalar(hexDigits[Int(byte & 0x0F)]))
            }
        }
        return result
    }

    private static let hexDigits = Array("0123456789ABCDEF".utf8)

    private static func isUnreserved(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "-"), UInt8(ascii: "~"), UInt8(ascii: "/"):
            return true
        default:
            return false
        }
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
