import FoundationEssentials
import VirtCore

/// What a command without arguments passes, and what a caller asks for when it wants no part of
/// the reply: encodes as `{}` and decodes from any JSON value.
public struct Nothing: Codable, Sendable, Equatable {
    public init() {}
    public init(from decoder: any Decoder) throws {}
    public func encode(to encoder: any Encoder) throws {
        _ = encoder.container(keyedBy: NoKeys.self)
    }

    private enum NoKeys: CodingKey {}
}

/// The JSON text of QMP and QGA messages, through Foundation's coders.
///
/// Integers are written as integers (QEMU rejects `3.0` where it expects one), byte strings
/// (`Data`) as base64 as QGA's `buf-b64`, `input-data`, `out-data` and `err-data` are, and `/` is
/// left unescaped so that paths read as written in logs.
enum MessageCoding {
    static func encoded(_ value: some Encodable) throws(VirtError) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        do {
            return Array(try encoder.encode(value))
        } catch {
            throw VirtError(.internalError, "cannot encode a QEMU message: \(error)")
        }
    }

    /// Decodes one JSON text; nil when it is not JSON or not of that shape.
    static func decoded<Value: Decodable>(_ type: Value.Type, from bytes: some Collection<UInt8>) -> Value? {
        try? JSONDecoder().decode(type, from: Data(bytes))
    }

    /// The start of `bytes` as text, for messages about a reply that was not understood.
    static func excerpt(_ bytes: some Collection<UInt8>) -> String {
        String(decoding: bytes.prefix(200), as: UTF8.self)
    }
}

/// A command line of QMP or QGA: `{"execute": ..., "arguments": ..., "id": ...}`; no arguments and
/// no id leave their members out.
struct Request<Arguments: Encodable>: Encodable {
    let execute: String
    let arguments: Arguments?
    let id: Int?

    /// The request's text and its newline.
    func line() throws(VirtError) -> [UInt8] {
        try MessageCoding.encoded(self) + [0x0A]
    }
}

/// A reply of QMP or QGA: a "return" value, or an "error" with a class and a description.
enum Reply<Value: Decodable>: Decodable {
    case success(Value)
    case failure(errorClass: String, description: String)

    private enum Keys: String, CodingKey {
        case `return`, error
    }

    private struct ErrorBody: Decodable {
        let `class`: String?
        let desc: String?
    }

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: Keys.self)
        if let error = try container.decodeIfPresent(ErrorBody.self, forKey: .error) {
            self = .failure(errorClass: error.class ?? "Error", description: error.desc ?? "no description")
        } else {
            self = .success(try container.decode(Value.self, forKey: .return))
        }
    }

    /// The "return" value of the reply `bytes`; an error reply is a
    /// ``VirtError/Code/testbedFailure`` error "<what>: <class>: <desc>", and so is a reply of
    /// another shape than `Value`'s.
    static func value(of bytes: some Collection<UInt8>, _ what: String) throws(VirtError) -> Value {
        guard let reply = MessageCoding.decoded(Reply.self, from: bytes) else {
            throw VirtError(.testbedFailure, "\(what): unexpected reply \(MessageCoding.excerpt(bytes))")
        }
        return try reply.value(what)
    }

    /// The "return" value; an error reply is a ``VirtError/Code/testbedFailure`` error
    /// "<what>: <class>: <desc>".
    func value(_ what: String) throws(VirtError) -> Value {
        switch self {
        case .success(let value): return value
        case .failure(let errorClass, let description):
            throw VirtError(.testbedFailure, "\(what): \(errorClass): \(description)")
        }
    }
}
