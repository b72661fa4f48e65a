import Testing
import VirtCore

@testable import VirtProtocol

@Suite("Request parsing and reply formatting")
struct RequestTests {
    @Test(
        "percent-decoding follows Python's unquote",
        arguments: [
            ("a%20b", "a b"), ("100%25", "100%"), ("%C3%BC%E2%82%AC", "ü€"), ("%zz", "%zz"), ("%4", "%4"),
            ("%", "%"), ("%2c%2C", ",,"), ("plain/path", "plain/path"), ("%ff", "\u{FFFD}"), ("%00", "\u{0}"),
        ])
    func decode(_ input: String, _ expected: String) {
        #expect(PercentCoding.decode(Array(input.utf8)) == expected)
    }

    @Test(
        "percent-encoding follows Python's quote with safe='/'",
        arguments: [
            ("/tmp/a b", "/tmp/a%20b"), ("x,y", "x%2Cy"), ("100%", "100%25"), ("ü", "%C3%BC"),
            ("A-z_0.9~/", "A-z_0.9~/"), ("TMPDIR=/x", "TMPDIR%3D/x"),
        ])
    func encode(_ input: String, _ expected: String) {
        #expect(PercentCoding.encode(input) == expected)
    }

    @Test("encoding then decoding gives back any string")
    func roundTrip() {
        for text in ["", "a b\tc\n", "%%%", "€ ü ✓ 𝄞", ",,,", "\u{0}\u{1}\u{7F}", "/a/b/"] {
            #expect(PercentCoding.decode(Array(PercentCoding.encode(text).utf8)) == text)
        }
    }

    @Test("words split on runs of whitespace and each word is decoded")
    func split() throws {
        let request = try Request.parse(Array(" copydown\t /a%20b   /c%2Fd \r".utf8))
        #expect(request.verb == .copydown)
        #expect(request.arguments == ["/a b", "/c/d"])
    }

    @Test("`-` and `_` are the same in a verb, and the verb is decoded too")
    func verbSpelling() throws {
        #expect(try Request.parse(Array("print_execute_command".utf8)).verb == .printExecuteCommand)
        #expect(try Request.parse(Array("print-execute-command".utf8)).verb == .printExecuteCommand)
        #expect(try Request.parse(Array("auxverb-debug_fail".utf8)).verb == .auxverbDebugFail)
        #expect(try Request.parse(Array("%71uit".utf8)).verb == .quit)
    }

    @Test(
        "misuse is reported with upstream's messages",
        arguments: [
            ("", "empty commands are not permitted"),
            ("  \t ", "empty commands are not permitted"),
            ("Open", "unknown command `Open'"),
            ("open now", "too many arguments to command `open'"),
            ("copyup /a", "too few arguments to command `copyup'"),
            ("reboot a b", "too many arguments to command `reboot'"),
            ("shell", "too few arguments to command `shell'"),
        ])
    func misuse(_ line: String, _ message: String) {
        #expect(throws: VirtError(.protocolMisuse, message)) { try Request.parse(Array(line.utf8)) }
    }

    @Test("shell takes any number of VAR=value words after the directory")
    func shellArguments() throws {
        let request = try Request.parse(Array("shell /tmp A=1 B=%20".utf8))
        #expect(request.arguments == ["/tmp", "A=1", "B= "])
    }

    @Test("replies: ok with words, copy-failed, timeout, and the one-word auxverb")
    func replies() {
        #expect(Reply.ok([]).line == "ok")
        #expect(Reply.ok(["/tmp/x", "y"]).line == "ok /tmp/x y")
        // A word with whitespace or control characters stays one word: they are percent-encoded.
        #expect(
            Reply.ok(["revert", "suggested-normal-user=x\tdowntmp-host=/p", "a b\n\u{85}\u{2003}"]).line
                == "ok revert suggested-normal-user=x%09downtmp-host=/p a%20b%0A%C2%85%E2%80%83")
        #expect(Reply.ok(["ü%/,x"]).line == "ok ü%/,x", "other words are written as given")
        #expect(Reply.copyFailed.line == "copy-failed")
        #expect(Reply.timeout.line == "timeout")
        #expect(Reply.executeCommandWord(["/usr/bin/x y", "--sock=/run/a"]) == "/usr/bin/x%20y,--sock%3D/run/a")
    }

    @Test("exit statuses: 12 for session failures, 16 for internal errors, EX_USAGE before the banner")
    func exitStatuses() {
        #expect(ExitStatus.inSession(VirtError(.protocolMisuse, "")) == 12)
        #expect(ExitStatus.inSession(VirtError(.testbedFailure, "")) == 12)
        #expect(ExitStatus.inSession(VirtError(.internalError, "")) == 16)
        #expect(ExitStatus.beforeBanner(VirtError(.usage, "")) == 64)
        #expect(ExitStatus.beforeBanner(VirtError(.unavailable, "")) == 69)
        #expect(ExitStatus.beforeBanner(VirtError(.notFound, "")) == 1)
    }
}
