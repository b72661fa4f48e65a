import Testing
import VirtCore

@testable import QemuMonitor

@Suite("JSON values, text and base64")
struct JSONValueTests {
    @Test("QMP replies parse into values that the accessors and literals can inspect")
    func parsesAReply() throws {
        let text = #"{"return": {"status": "running", "running": true, "pid": 30720, "ratio": -1.5e2}, "id": 7}"#
        let value = try JSONValue(parsing: text)
        #expect(value["id"]?.intValue == 7)
        #expect(value["return"]?["status"]?.stringValue == "running")
        #expect(value["return"]?["running"]?.boolValue == true)
        #expect(value["return"]?["pid"] == 30720)
        #expect(value["return"]?["ratio"]?.doubleValue == -150)
        #expect(value["return"]?["ratio"]?.intValue == -150)
        #expect(value["missing"] == nil)
        #expect(value["return"]?["status"]?["nested"] == nil)
        #expect(try JSONValue(parsing: " [1, [], {}, null, false] ")[3]?.isNull == true)
        #expect(try JSONValue(parsing: "[1]")[1] == nil)
        #expect(try JSONValue(parsing: "0.5").intValue == nil)
    }

    @Test("escapes decode, including surrogate pairs; a lone surrogate becomes U+FFFD as QEMU writes it")
    func escapes() throws {
        let text = #""a\"b\\c\/d\b\f\n\r\t\u00e9\u201C\ud83d\ude00\ud800x""#
        #expect(try JSONValue(parsing: text) == .string("a\"b\\c/d\u{8}\u{C}\n\r\té\u{201C}😀\u{FFFD}x"))
        #expect(try JSONValue(parsing: "\"caf\u{E9} \u{1F600}\"") == "café 😀")
    }

    @Test("writing then parsing gives the same value back, for every kind of value")
    func roundTrip() throws {
        let value: JSONValue = [
            "execute": "guest-exec",
            "arguments": [
                "path": "/bin/sh", "arg": ["-c", "printf '%s\\n' \"$1\"\t\u{1}\u{7F}é😀"],
                "capture-output": true, "nothing": nil, "float": 0.1, "negative": -42, "big": 1e300,
                "nested": [[[]], [:]],
            ],
        ]
        #expect(try JSONValue(parsing: value.serialized) == value)
        #expect(try JSONValue(parsing: value.serializedBytes) == value)
    }

    @Test("integral numbers are written without a fraction, since QEMU rejects 3.0 for an integer")
    func integers() {
        #expect(JSONValue(3).serialized == "3")
        #expect(JSONValue.number(-0.0).serialized == "0")
        #expect(JSONValue.number(4_503_599_627_370_496).serialized == "4503599627370496")
        #expect(JSONValue.number(1.5).serialized == "1.5")
        #expect(JSONValue.number(.nan).serialized == "null")
        #expect(JSONValue(["a", "b"]).serialized == #"["a","b"]"#)
    }

    @Test("objects are written compactly with sorted keys, control characters escaped")
    func compactOutput() {
        let value: JSONValue = ["id": 1, "execute": "x", "arguments": ["text": "a\"\n\u{1F}"]]
        #expect(value.serialized == #"{"arguments":{"text":"a\"\n\u001f"},"execute":"x","id":1}"#)
        #expect(value.description == value.serialized)
    }

    @Test(
        "malformed text is a testbed failure naming the position",
        arguments: [
            "", "{", "[1,]", "{\"a\" 1}", "01", "1.", "-", "tru", "\"abc", "\"\\x\"", "\"\\u12\"", "1 2", "{'a': 1}",
            "\"tab\there\"", "[" + String(repeating: "[", count: 300) + String(repeating: "]", count: 301),
        ])
    func rejectsMalformedText(text: String) {
        #expect {
            try JSONValue(parsing: text)
        } throws: { error in
            (error as? VirtError)?.code == .testbedFailure && (error as? VirtError)?.message.contains("at byte") == true
        }
    }

    @Test("base64 matches RFC 4648's test vectors and rejects anything else")
    func base64() {
        let vectors = ["": "", "f": "Zg==", "fo": "Zm8=", "foo": "Zm9v", "foob": "Zm9vYg==", "fooba": "Zm9vYmE="]
        for (plain, encoded) in vectors {
            #expect(Base64.encode(Array(plain.utf8)) == encoded)
            #expect(Base64.decode(encoded) == Array(plain.utf8))
        }
        let bytes = (0...255).map { UInt8($0) } + [0, 0xFF]
        #expect(Base64.decode(Base64.encode(bytes)) == bytes)
        #expect(Base64.decode("Zm9vYg") == Array("foob".utf8))
        #expect(Base64.decode("Zm9v\n") == nil)
        #expect(Base64.decode("Z") == nil)
        #expect(Base64.decode("Zm9v====") == nil)
        #expect(Base64.decode("Zm-v") == nil)
    }
}
