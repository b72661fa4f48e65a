import FoundationEssentials
import Testing
import VirtCore

@testable import QemuMonitor

@Suite("QMP and QGA messages, typed")
struct MessagesTests {
    @Test(
        "a request writes integers without a fraction, bytes as base64, paths unescaped, and leaves out what is absent")
    func requests() throws {
        let exec = QGAClient.Exec(
            path: "/bin/sh", arguments: ["-c", "printf '%s\\n' \"$1\"\t\u{1}é😀"], environment: nil,
            input: Data([1, 2, 3]), captureOutput: true)
        let line = try Request(execute: "guest-exec", arguments: exec, id: 7).line()
        #expect(line.last == 0x0A)
        #expect(line.dropLast().contains(0x0A) == false, "one line")
        let text = String(decoding: line.dropLast(), as: UTF8.self)
        #expect(
            text
                == #"{"arguments":{"arg":["-c","printf '%s\\n' \"$1\"\t\u0001é😀"],"capture-output":true,"input-data":"AQID","path":"/bin/sh"},"execute":"guest-exec","id":7}"#
        )
        let bare = try Request(execute: "query-status", arguments: Nothing?.none, id: nil).line()
        #expect(String(decoding: bare, as: UTF8.self) == #"{"execute":"query-status"}"# + "\n")
        let sized = try Request(
            execute: "guest-file-read", arguments: QGAClient.FileRead(handle: 1, count: 1 << 22), id: nil
        )
        .line()
        #expect(String(decoding: sized, as: UTF8.self).contains(#""count":4194304"#))
    }

    @Test("a reply gives its return value; an error reply names its class and description; another shape is an error")
    func replies() throws {
        #expect(try Reply<QGAClient.ExecStarted>.value(of: Array(#"{"return": {"pid": 42}}"#.utf8), "QGA x").pid == 42)
        #expect(try Reply<Int>.value(of: Array(#" {"return": 5, "id": 1} "#.utf8), "QMP x") == 5)
        #expect(throws: VirtError(.testbedFailure, "QMP nope: CommandNotFound: The command nope has not been found")) {
            try Reply<Nothing>.value(
                of: Array(
                    #"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#.utf8),
                "QMP nope")
        }
        #expect(throws: VirtError(.testbedFailure, "QGA y: Error: no description")) {
            try Reply<Nothing>.value(of: Array(#"{"error": {}}"#.utf8), "QGA y")
        }
        #expect(throws: VirtError(.testbedFailure, #"QGA guest-exec: unexpected reply {"return": {"pid": "x"}}"#)) {
            try Reply<QGAClient.ExecStarted>.value(of: Array(#"{"return": {"pid": "x"}}"#.utf8), "QGA guest-exec")
        }
        #expect(throws: VirtError(.testbedFailure, "QMP z: unexpected reply {\"return\": ")) {
            try Reply<Nothing>.value(of: Array(#"{"return": "#.utf8), "QMP z")
        }
        #expect(throws: VirtError.self) { try Reply<Nothing>.value(of: Array(#"{"id": 3}"#.utf8), "QMP w") }
        // Nothing takes any return value, so callers that need none of a reply never fail on it.
        for value in ["{}", "[1, 2]", "\"text\"", "null", "3.5"] {
            #expect(throws: Never.self) { try Reply<Nothing>.value(of: Array(#"{"return": \#(value)}"#.utf8), "QMP n") }
        }
    }

    @Test("guest-exec-status decodes exit code, signal, base64 output and truncation; bad base64 is an error")
    func execStatus() throws {
        let text =
            #"{"return": {"exited": true, "exitcode": 3, "out-data": "aGVsbG8K", "err-data": "AP8K", "err-truncated": true}}"#
        let status = try Reply<QGAClient.ExecStatus>.value(of: Array(text.utf8), "QGA guest-exec-status")
        #expect(status.exited)
        #expect(
            status.result
                == GuestExecResult(
                    exitCode: 3, signal: nil, standardOutput: Array("hello\n".utf8), standardError: [0, 0xFF, 0x0A],
                    outputTruncated: true))
        let running = try Reply<QGAClient.ExecStatus>.value(of: Array(#"{"return": {"exited": false}}"#.utf8), "QGA s")
        #expect(!running.exited && running.result == GuestExecResult())
        #expect(throws: VirtError.self) {
            try Reply<QGAClient.ExecStatus>.value(
                of: Array(#"{"return": {"exited": true, "out-data": "not base64!"}}"#.utf8), "QGA s")
        }
    }

    @Test("an event's data decodes as the type asked for, or nil; a greeting is only QEMU's")
    func eventsAndGreeting() {
        let line = Array(
            #"{"event": "VSERPORT_CHANGE", "data": {"id": "helper", "open": false}, "timestamp": {}}"#.utf8)
        let event = QMPEvent(name: "VSERPORT_CHANGE", line: line)
        #expect(event.data(as: QMP.SerialPortChange.self) == QMP.SerialPortChange(id: "helper", open: false))
        #expect(event.data(as: QMP.StatusInfo.self) == nil)
        #expect(QMPEvent(name: "STOP", line: Array(#"{"event": "STOP"}"#.utf8)).data(as: Nothing.self) == nil)
        let greeting = QMPGreeting.parse(
            Array(
                #"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian"}, "capabilities": ["oob"]}}"#
                    .utf8))
        #expect(greeting?.version.major == 10 && greeting?.version.micro == 2 && greeting?.capabilities == ["oob"])
        #expect(QMPGreeting.parse(Array(#"{"return": {}}"#.utf8)) == nil)
        #expect(QMPGreeting.parse(Array("garbage".utf8)) == nil)
    }
}
