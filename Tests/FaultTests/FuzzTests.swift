import CommandRunner
import Foundation
import Testing
import VirtBenchmark
import VirtCore
import VirtProtocol
import VirtTestSupport

/// Random request lines, hostile on purpose: unknown verbs, wrong argument counts, huge lines,
/// invalid percent-encoding, invalid UTF-8, NUL bytes, empty lines, and copies whose paths have
/// `..`, newlines, commas, quotes and shell syntax. Paths always decode to places inside
/// `root` (the fixture's testbed is the host itself), whatever their encoding: absolute ones
/// under it, relative ones for a server whose working directory it is.
struct RequestFuzzer {
    var generator: SplitMix
    let root: String
    let marker: String

    init(seed: UInt64, root: String, marker: String) {
        generator = SplitMix(seed: seed)
        self.root = root
        self.marker = marker
    }

    mutating func number(_ bound: Int) -> Int { Int(generator.next() % UInt64(bound)) }

    mutating func pick<T>(_ choices: [T]) -> T { choices[number(choices.count)] }

    /// A path component that stays one component once decoded, and nothing a shell would run.
    mutating func component() -> String {
        pick([
            "a", "with space", "new\nline", "comma,here", "per%cent", "quote'\"", "ünïcødé ✓", "-dash",
            "$(touch \(marker))", "`touch \(marker)`", "; touch \(marker)", "| touch \(marker) #", "*", "~",
            "tab\there", "\u{7f}", "..dots..", ".hidden", "x", "a&b", "$HOME", "back\\slash",
        ]).replacingOccurrences(of: "/", with: "_")
    }

    /// A path under `root`, absolute or (one in four, when `relative` allows) relative to it:
    /// some components, perhaps `sub/..` pairs, perhaps a trailing slash.
    mutating func path(directory: Bool? = nil, relative: Bool = false) -> String {
        var parts = relative && number(4) == 0 ? [pick([".", "x/.."])] : [root]
        for _ in 0..<(1 + number(3)) {
            if number(4) == 0 { parts += [component(), ".."] }
            parts.append(component())
        }
        return parts.joined(separator: "/") + ((directory ?? (number(4) == 0)) ? "/" : "")
    }

    /// `text` percent-encoded as the protocol wants it, with extra characters encoded at random.
    mutating func encode(_ text: String) -> [UInt8] {
        var out: [UInt8] = []
        var escape = 0
        for byte in Array(PercentCoding.encode(text).utf8) {
            // The two digits of an escape stay as they are; any other byte but `/` may be
            // escaped again.
            if byte == UInt8(ascii: "%") {
                escape = 2
                out.append(byte)
            } else if escape > 0 {
                escape -= 1
                out.append(byte)
            } else if number(5) == 0 && byte != UInt8(ascii: "/") {
                out += Array(String(format: "%%%02X", byte).utf8)
            } else {
                out.append(byte)
            }
        }
        return out
    }

    /// A copy request that is never misuse (the paths agree about being a directory), for the
    /// sessions that must reach the protocol's clean ending.
    mutating func cleanLine() -> [UInt8] {
        let verb = pick(["copydown ", "copyup "])
        let directory = number(4) == 0
        return Array(verb.utf8) + encode(path(directory: directory, relative: true)) + Array(" ".utf8)
            + encode(path(directory: directory, relative: true))
    }

    mutating func line() -> [UInt8] {
        switch number(16) {
        case 0: return Array(pick(["capabilities", "print-execute-command", "open", "close", "revert", "reboot"]).utf8)
        case 1: return Array(pick(["open now", "close 1", "copydown a", "copyup a b c", "capabilities x"]).utf8)
        case 2: return Array(pick(["frobnicate", "OPEN", "copy-down", "rm -rf /", "ok", "quit!"]).utf8)
        case 3: return Array(repeating: UInt8(ascii: "a"), count: (1 << 20) + number(1 << 19))
        case 4: return Array(pick(["copydown %G1 %", "copyup %%% %2", "copydown %ZZ%zz %"]).utf8)
        case 5: return Array("copydown ".utf8) + [0xFF, 0xFE, 0x80] + Array(" \(root)/x".utf8)
        case 6: return Array("copydown \(root)/a".utf8) + [0] + Array("b \(root)/c".utf8)
        case 7: return pick([[], Array("   ".utf8), Array("\t".utf8), Array(" open".utf8)])
        case 8: return Array("copydown \(root)/missing \(root)/m".utf8)
        case 9:
            let nul = Array("%00".utf8)
            return Array("copyup ".utf8) + encode(path()) + nul + Array(" ".utf8) + encode(path())
        default:
            let verb = pick(["copydown ", "copyup "])
            return Array(verb.utf8) + encode(path(relative: true)) + Array(" ".utf8) + encode(path(relative: true))
        }
    }
}

/// Replies the protocol allows.
func isProtocolReply(_ line: String) -> Bool {
    line == "ok" || line.hasPrefix("ok ") || line == "copy-failed" || line == "timeout"
}

extension FaultSuite {
    @Suite("Protocol fuzzing")
    struct FuzzTests {
        /// Seconds of fuzzing; CI's default keeps the suite short.
        static let seconds = Int(ProcessInfo.processInfo.environment["DEBUSINE_VIRT_FUZZ_SECONDS"] ?? "") ?? 20

        @Test("random hostile sessions against the session loop: never a crash, a hang or a stray file")
        func fixtureSessions() async throws {
            try await faultCase(
                "fixture", "\(Self.seconds) s of random hostile request lines",
                expected: "every reply ok/copy-failed/timeout, exit 0 or 12, nothing left, no shell ran"
            ) { checks in
                let clock = ContinuousClock()
                let deadline = clock.now + .seconds(Self.seconds)
                var seed: UInt64 = UInt64(truncatingIfNeeded: Date().timeIntervalSince1970.bitPattern)
                var sessions = 0
                var seen: [String: Int] = [:]
                while clock.now < deadline {
                    seed &+= 1
                    let parent = try TestPaths.makeTemporaryDirectory("dv-fuzz.")
                    let root = try TestPaths.makeTemporaryDirectory("dv-fuzz-files.")
                    let marker = "\(root)/pwned"
                    defer {
                        TestPaths.removeTree(parent)
                        TestPaths.removeTree(root)
                    }
                    try "data".write(toFile: "\(root)/a", atomically: false, encoding: .utf8)
                    var fuzzer = RequestFuzzer(seed: seed, root: root, marker: marker)
                    // Relative host paths land in the server's working directory: `root`.
                    let server = try ServerProcess(
                        [TestPaths.executable("virt-fixture-server"), "--fixture", "parent=\(parent)"],
                        workingDirectory: root)
                    #expect(try await server.readLine() == "ok")
                    var sent: [String] = []
                    var ended = false
                    // One session in eight sends no misuse and quits: about half the lines of
                    // the others are misuse, so without these a run could end every session
                    // with 12 and never check the clean ending (it once did, 77 times).
                    let clean = sessions % 8 == 7
                    if clean || fuzzer.number(2) == 0 {
                        _ = server.write(line: "open")
                        sent.append("open")
                        if let reply = try await server.readLine(timeout: .seconds(30)) {
                            checks.expect(reply.hasPrefix("ok /"), "seed \(seed): open replied \(reply)")
                        }
                    }
                    for _ in 0..<(1 + fuzzer.number(12)) {
                        let line = clean ? fuzzer.cleanLine() : fuzzer.line()
                        sent.append(String(decoding: line.prefix(120), as: UTF8.self))
                        guard server.write(line + [0x0A]) else { break }
                        guard let reply = try await server.readLine(timeout: .seconds(60)) else {
                            ended = true
                            break
                        }
                        checks.expect(isProtocolReply(reply), "seed \(seed): reply `\(reply)` after \(sent.last ?? "")")
                        seen[reply == "ok" || reply.hasPrefix("ok ") ? "ok" : reply, default: 0] += 1
                    }
                    if !ended { _ = server.write(line: clean || fuzzer.number(3) == 0 ? "quit" : "close") }
                    server.closeStandardInput()
                    let status = try await server.wait(timeout: .seconds(60))
                    checks.expect(
                        status == .exited(0) || status == .exited(12),
                        "seed \(seed): ended with \(status) after \(sent)\n\(server.standardError)")
                    seen["\(status)", default: 0] += 1
                    checks.expect(TestPaths.contents(of: parent).isEmpty, "seed \(seed): testbed left: \(sent)")
                    checks.expect(access(marker, F_OK) != 0, "seed \(seed): a shell ran something from \(sent)")
                    sessions += 1
                }
                checks.expect(sessions >= 5, "only \(sessions) sessions in \(Self.seconds) s")
                // The fuzzer must reach every kind of ending, or it tests less than it claims.
                for kind in ["ok", "copy-failed", "exit status 0", "exit status 12"] {
                    checks.expect(seen[kind, default: 0] > 0, "no `\(kind)` in \(sessions) sessions: \(seen)")
                }
            }
        }

        /// Hostile copies into a real testbed: each is done or refused, the session goes on, no
        /// shell runs anything, and the testbed still works.
        func hostileCopies(_ backend: Backend) async throws {
            try await faultCase(
                backend.rawValue, "hostile paths in copydown/copyup (.., newlines, commas, quotes, shell syntax, NUL)",
                expected: "ok or copy-failed, session goes on, no shell ran, nothing left"
            ) { checks in
                let work = try TestPaths.makeTemporaryDirectory("dv-fuzz-files.")
                defer { TestPaths.removeTree(work) }
                let marker = "/tmp/dv-pwned-\(getpid())-\(backend.rawValue)"
                try "data".write(toFile: "\(work)/a", atomically: false, encoding: .utf8)
                let server = try await ServerUnderTest.start(backend)
                let scratch = try await server.open()
                let auxverb = try await server.auxverb()
                var host = RequestFuzzer(seed: 7, root: work, marker: marker)
                var testbed = RequestFuzzer(seed: 11, root: scratch, marker: marker)
                var exited = false
                var copied = 0
                for index in 0..<40 {
                    // Pairs: a file copied down under a hostile name straight into the scratch directory (so
                    // it can succeed), then up again under another; every tenth pair goes through `..` and
                    // missing directories, or carries a NUL.
                    let name = testbed.component()
                    let deep = index % 10 >= 8
                    let inside = deep ? testbed.path(directory: false) : "\(scratch)/\(name)"
                    let back = deep ? host.path(directory: false) : "\(work)/back \(index) \(host.component())"
                    var down =
                        Array("copydown ".utf8) + host.encode("\(work)/a") + Array(" ".utf8) + testbed.encode(inside)
                    var up = Array("copyup ".utf8) + testbed.encode(inside) + Array(" ".utf8) + host.encode(back)
                    if index % 10 == 9 {
                        down += Array("%00x".utf8)
                        up += Array("%00x".utf8)
                    }
                    var replies: [String] = []
                    for line in [down, up] {
                        guard server.process.write(line + [0x0A]),
                            let reply = try await server.process.readLine(timeout: .seconds(300))
                        else {
                            exited = true
                            break
                        }
                        checks.expect(
                            isProtocolReply(reply), "reply `\(reply)` to \(String(decoding: line, as: UTF8.self))")
                        if reply == "ok" { copied += 1 }
                        replies.append(reply)
                    }
                    if exited { break }
                    if !deep {
                        let content = try? String(contentsOfFile: back, encoding: .utf8)
                        checks.expect(
                            content == "data",
                            "\(name) did not come back intact: \(content ?? "missing") (\(replies), \(back))")
                    }
                }
                checks.expect(copied >= 40, "only \(copied) of 80 hostile copies succeeded")
                checks.expect(!exited, "the session ended:\n\(server.process.standardError)")
                let inside = try await SubprocessRunner().run(Command(argv: auxverb + ["test", "-e", marker]))
                checks.expect(inside.status == .exited(1), "a shell in the testbed ran something (\(inside.status))")
                checks.expect(access(marker, F_OK) != 0, "a shell on the host ran something")
                let works = try await SubprocessRunner().run(Command(argv: auxverb + ["true"]))
                checks.expect(works.status.succeeded, "the testbed no longer works")
                checks.expect(try await server.process.request("close") == "ok", "close failed")
                server.process.write(line: "quit")
                checks.expect(try await server.process.wait() == .exited(0), "quit did not end it")
                let left = try await server.leftovers()
                checks.expect(left.isEmpty, "left behind: \(left)")
                await server.discard()
            }
        }

        @Test("hostile copies into an Incus container", .enabled(if: Backend.incusEnabled), .timeLimit(.minutes(10)))
        func incusHostileCopies() async throws { try await hostileCopies(.incus) }

        @Test("hostile copies into a QEMU VM", .enabled(if: Backend.qemuEnabled), .guestSlot(minutes: 15))
        func qemuHostileCopies() async throws { try await hostileCopies(.qemu) }
    }
}
