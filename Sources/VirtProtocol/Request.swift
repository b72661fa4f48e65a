import VirtCore

/// The verbs of the virt-server protocol.
public enum Verb: String, Sendable, CaseIterable {
    case capabilities
    case open
    case close
    case revert
    case reboot
    case printExecuteCommand = "print_execute_command"
    case copydown
    case copyup
    case shell
    case quit
    case auxverbDebugFail = "auxverb_debug_fail"

    /// Looks a verb up the way autopkgtest does: `-` and `_` are the same character.
    public init?(word: String) {
        self.init(rawValue: String(word.map { $0 == "-" ? "_" : $0 }))
    }

    /// How many arguments after the verb are required, and how many more are allowed
    /// (`nil`: any number).
    public var arity: (required: Int, optional: Int?) {
        switch self {
        case .capabilities, .open, .close, .revert, .printExecuteCommand, .quit, .auxverbDebugFail:
            return (0, 0)
        case .reboot: return (0, 1)
        case .copydown, .copyup: return (2, 0)
        case .shell: return (1, nil)
        }
    }
}

/// One request line, split and decoded.
public struct Request: Sendable, Equatable {
    /// The verb as the client spelled it, before decoding (used in messages, as upstream does).
    public let rawVerb: String
    public let verb: Verb
    /// The decoded arguments after the verb.
    public let arguments: [String]

    public init(verb: Verb, arguments: [String], rawVerb: String? = nil) {
        self.verb = verb
        self.arguments = arguments
        self.rawVerb = rawVerb ?? verb.rawValue.replacingUnderscores()
    }

    /// Parses a request line (without its newline): words are separated by runs of ASCII
    /// whitespace, each word is percent-decoded, the verb is looked up and its arity checked.
    ///
    /// Every failure is a ``VirtError/Code/protocolMisuse`` whose message matches upstream's.
    public static func parse<Bytes: Collection>(_ line: Bytes) throws(VirtError) -> Request
    where Bytes.Element == UInt8 {
        let rawWords = split(line)
        guard let rawVerbBytes = rawWords.first else {
            throw VirtError(.protocolMisuse, "empty commands are not permitted")
        }
        let rawVerb = String(decoding: rawVerbBytes, as: UTF8.self)
        guard let verb = Verb(word: PercentCoding.decode(rawVerbBytes)) else {
            throw VirtError(.protocolMisuse, "unknown command `\(rawVerb)'")
        }
        let arguments = rawWords.dropFirst().map { PercentCoding.decode($0) }
        let (required, optional) = verb.arity
        if arguments.count < required {
            throw VirtError(.protocolMisuse, "too few arguments to command `\(rawVerb)'")
        }
        if let optional, arguments.count > required + optional {
            throw VirtError(.protocolMisuse, "too many arguments to command `\(rawVerb)'")
        }
        return Request(verb: verb, arguments: arguments, rawVerb: rawVerb)
    }

    /// Splits on ASCII whitespace and the ASCII separators 0x1C-0x1F, which Python's
    /// `str.split()` also treats as whitespace.
    static func split<Bytes: Collection>(_ line: Bytes) -> [[UInt8]] where Bytes.Element == UInt8 {
        var words: [[UInt8]] = []
        var current: [UInt8] = []
        for byte in line {
            switch byte {
            case 0x09...0x0D, 0x1C...0x20:
                if !current.isEmpty {
                    words.append(current)
                    current = []
                }
            default:
                current.append(byte)
            }
        }
        if !current.isEmpty { words.append(current) }
        return words
    }
}

extension String {
    fileprivate func replacingUnderscores() -> String { String(map { $0 == "_" ? "-" : $0 }) }

    fileprivate func leftPadded(_ width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// A reply line.
public enum Reply: Sendable, Equatable {
    /// `ok` followed by words, written as given (callers encode where needed), except that
    /// whitespace and control characters in a word are percent-encoded: the client splits the
    /// line on whitespace, so a word holding a tab would reach it as two words (a capability of
    /// the testbed's making, say), where percent-encoded it stays one.
    case ok([String])
    /// The copy failed; the session goes on.
    case copyFailed
    /// The copy ran over its timeout; the session goes on.
    case timeout

    /// The line to write, without the newline.
    public var line: String {
        switch self {
        case .ok(let words): return (["ok"] + words.map(Self.oneWord)).joined(separator: " ")
        case .copyFailed: return "copy-failed"
        case .timeout: return "timeout"
        }
    }

    /// `word` with every whitespace or control character (as ASCII or Unicode has them)
    /// percent-encoded, byte by byte.
    static func oneWord(_ word: String) -> String {
        guard word.unicodeScalars.contains(where: Self.splits) else { return word }
        var out = ""
        for scalar in word.unicodeScalars {
            if Self.splits(scalar) {
                for byte in String(scalar).utf8 { out += "%" + String(byte, radix: 16, uppercase: true).leftPadded(2) }
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    static func splits(_ scalar: Unicode.Scalar) -> Bool {
        scalar.properties.isWhitespace || scalar.properties.generalCategory == .control
    }

    /// The single word that `print-execute-command` answers with: each argv element
    /// percent-encoded, joined by commas.
    public static func executeCommandWord(_ argv: [String]) -> String {
        argv.map(PercentCoding.encode).joined(separator: ",")
    }
}
