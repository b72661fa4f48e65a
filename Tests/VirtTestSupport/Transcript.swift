import CommandRunner
import Foundation
import VirtCore

/// A protocol transcript: requests to send, replies expected, how the server must end.
/// The format is described in protocol-spec/README.md ("Transcripts").
public struct Transcript: Sendable, CustomStringConvertible {
    public enum Step: Sendable, Equatable {
        /// Bytes to send, without the newline; `$SCRATCH` is substituted before sending.
        case send([UInt8])
        /// The exact next reply; `$SCRATCH` binds on first use.
        case expect(String)
        /// The next reply must match this regular expression as a whole.
        case match(String)
        /// Close the server's stdin.
        case endOfFile
    }

    public let name: String
    public var fixture: [String] = []
    /// Environment for the server (`@env KEY=VALUE`).
    public var environment: [String: String] = [:]
    public var steps: [Step] = []
    public var expectedEnd: ProcessStatus?
    public var stderrContains: [String] = []
    /// The server runs in a fresh directory of its own (`@own-directory`): for relative host
    /// paths, which are relative to the server's working directory.
    public var ownDirectory = false
    /// Files that must exist in that directory once the server has ended (`?cwd-file PATH`).
    public var filesInDirectory: [String] = []

    public var description: String { name }

    public init(name: String, text: String) throws {
        self.name = name
        for (number, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = String(rawLine)
            func fail(_ why: String) -> VirtError { VirtError(.usage, "\(name):\(number + 1): \(why)") }
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("> ") || line == ">" {
                steps.append(.send(try Transcript.unescape(String(line.dropFirst(2)), fail)))
            } else if line.hasPrefix("<~ ") {
                steps.append(.match(String(line.dropFirst(3))))
            } else if line.hasPrefix("< ") {
                steps.append(.expect(String(line.dropFirst(2))))
            } else if line == "!eof" {
                steps.append(.endOfFile)
            } else if line.hasPrefix("=exit ") {
                guard let code = Int32(line.dropFirst(6)) else { throw fail("bad exit status") }
                expectedEnd = .exited(code)
            } else if line.hasPrefix("=signal ") {
                let names: [String: Int32] = ["TERM": SIGTERM, "INT": SIGINT, "HUP": SIGHUP, "PIPE": SIGPIPE]
                guard let number = names[String(line.dropFirst(8))] else { throw fail("unknown signal") }
                expectedEnd = .signaled(number)
            } else if line.hasPrefix("?stderr ") {
                stderrContains.append(String(line.dropFirst(8)))
            } else if line.hasPrefix("@env ") {
                let assignment = line.dropFirst(5)
                guard let equals = assignment.firstIndex(of: "=") else { throw fail("@env needs KEY=VALUE") }
                environment[String(assignment[..<equals])] = String(assignment[assignment.index(after: equals)...])
            } else if line == "@own-directory" {
                ownDirectory = true
            } else if line.hasPrefix("?cwd-file ") {
                filesInDirectory.append(String(line.dropFirst(10)))
            } else if line.hasPrefix("@fixture ") {
                fixture.append(String(line.dropFirst(9)))
            } else {
                throw fail("cannot parse: \(line)")
            }
        }
        guard expectedEnd != nil else { throw VirtError(.usage, "\(name): no =exit or =signal line") }
        guard ownDirectory || filesInDirectory.isEmpty else {
            throw VirtError(.usage, "\(name): ?cwd-file needs @own-directory")
        }
    }

    /// Loads every `*.transcript` in a directory, sorted by name.
    public static func load(directory: String) throws -> [Transcript] {
        let names = try FileManager.default.contentsOfDirectory(atPath: directory)
            .filter { $0.hasSuffix(".transcript") }.sorted()
        return try names.map { name in
            try Transcript(name: name, text: String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8))
        }
    }

    static func unescape(_ text: String, _ fail: (String) -> VirtError) throws -> [UInt8] {
        var bytes: [UInt8] = []
        var iterator = Array(text.utf8).makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "\\") else {
                bytes.append(byte)
                continue
            }
            switch iterator.next() {
            case UInt8(ascii: "\\"): bytes.append(UInt8(ascii: "\\"))
            case UInt8(ascii: "t"): bytes.append(0x09)
            case UInt8(ascii: "r"): bytes.append(0x0D)
            case UInt8(ascii: "0"): bytes.append(0)
            case UInt8(ascii: "x"):
                guard let high = iterator.next(), let low = iterator.next(),
                    let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
                else { throw fail("bad \\x escape") }
                bytes.append(value)
            default: throw fail("bad escape")
            }
        }
        return bytes
    }
}

/// One side of a conversation with a server, whichever way it runs.
public protocol ServerPeer: Sendable {
    func send(_ bytes: [UInt8]) async
    func closeInput() async
    /// The next reply line, nil once the server's output has ended.
    func readLine() async throws -> String?
    func end() async throws -> ProcessStatus
    var standardError: String { get async }
}

/// What went wrong in a replay, or nil.
public struct ReplayFailure: Error, CustomStringConvertible {
    public let description: String
}

extension Transcript {
    /// Plays the transcript against `peer`; throws a ``ReplayFailure`` at the first difference.
    /// `checkStandardError` is false for in-process replays, whose stderr is the test runner's.
    public func replay(_ peer: some ServerPeer, checkStandardError: Bool) async throws {
        var scratch: String?
        var sentEOF = false
        for step in steps {
            switch step {
            case .send(let bytes):
                var line = bytes
                if let scratch {
                    line = Array(
                        String(decoding: bytes, as: UTF8.self)
                            .replacingOccurrences(of: "$SCRATCH", with: scratch).utf8)
                }
                await peer.send(line + [UInt8(ascii: "\n")])
            case .endOfFile:
                await peer.closeInput()
                sentEOF = true
            case .expect(let expected):
                let line = try await peer.readLine()
                guard let line else {
                    throw ReplayFailure(description: "\(name): expected `\(expected)`, got end of output")
                }
                if let range = expected.range(of: "$SCRATCH") {
                    let prefix = String(expected[..<range.lowerBound])
                    let suffix = String(expected[range.upperBound...])
                    guard line.hasPrefix(prefix), line.hasSuffix(suffix), line.count > prefix.count + suffix.count
                    else {
                        throw ReplayFailure(description: "\(name): expected `\(expected)`, got `\(line)`")
                    }
                    let value = String(line.dropFirst(prefix.count).dropLast(suffix.count))
                    if let scratch, scratch != value {
                        throw ReplayFailure(description: "\(name): scratch path changed from \(scratch) to \(value)")
                    }
                    scratch = value
                } else if line != expected {
                    throw ReplayFailure(description: "\(name): expected `\(expected)`, got `\(line)`")
                }
            case .match(let pattern):
                let line = try await peer.readLine()
                guard let line, (try? Regex(pattern).wholeMatch(in: line)) != nil else {
                    throw ReplayFailure(
                        description: "\(name): expected a line matching /\(pattern)/, got `\(line ?? "end of output")`")
                }
            }
        }
        if !sentEOF { await peer.closeInput() }
        if let extra = try await peer.readLine() {
            throw ReplayFailure(description: "\(name): unexpected extra reply `\(extra)`")
        }
        let end = try await peer.end()
        guard end == expectedEnd else {
            throw ReplayFailure(
                description:
                    "\(name): server ended with \(end), expected \(expectedEnd.map { "\($0)" } ?? "?")\n\(await peer.standardError)"
            )
        }
        if checkStandardError {
            let stderr = await peer.standardError
            for needle in stderrContains where !stderr.contains(needle) {
                throw ReplayFailure(description: "\(name): stderr lacks `\(needle)`:\n\(stderr)")
            }
        }
    }
}

extension ServerProcess: ServerPeer {
    public func send(_ bytes: [UInt8]) async { write(bytes) }
    public func closeInput() async { closeStandardInput() }
    public func readLine() async throws -> String? { try await readLine(timeout: .seconds(60)) }
    public func end() async throws -> ProcessStatus { try await wait() }
}
