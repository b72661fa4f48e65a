import CommandRunner
import FixtureBackend
import TestbedCore
import VirtCore
import VirtSession

/// The session loop run inside the test process over the fixture backend: requests go in as
/// line events, replies are collected from the ``ReplyWriter``.
public final class InProcessPeer: ServerPeer {
    private let requests: AsyncStream<LineReader.Event>.Continuation
    private let replies: LineQueue
    private let outcome: Task<SessionOutcome, Never>

    public init(fixture: [String], environment: [String: String] = [:]) throws {
        let copyTimeout = environment["AUTOPKGTEST_VIRT_COPY_TIMEOUT"].flatMap(Int.init).map { Duration.seconds($0) }
        let (stream, continuation) = AsyncStream.makeStream(of: LineReader.Event.self)
        let replies = LineQueue()
        let options = try FixtureTestbed.Options(words: fixture)
        let controller = TestbedController(backend: FixtureTestbed(options: options), copyTimeout: copyTimeout)
        let session = Session(controller: controller, output: Collector(queue: replies))
        self.requests = continuation
        self.replies = replies
        self.outcome = Task {
            let outcome = await session.run(stream)
            replies.finish()
            return outcome
        }
    }

    public func send(_ bytes: [UInt8]) async {
        var line: [UInt8] = []
        for byte in bytes {
            if byte == UInt8(ascii: "\n") {
                requests.yield(.line(line))
                line = []
            } else {
                line.append(byte)
            }
        }
        if !line.isEmpty { requests.yield(.line(line)) }
    }

    public func closeInput() async { requests.finish() }

    public func readLine() async throws -> String? { try await replies.next(timeout: .seconds(60)) }

    public func end() async throws -> ProcessStatus {
        switch await outcome.value {
        case .exit(let code): return .exited(code)
        case .signal(let number): return .signaled(number)
        }
    }

    public var standardError: String { "" }

    struct Collector: ReplyWriter {
        let queue: LineQueue
        func writeLine(_ line: String) throws(VirtError) { queue.push(line) }
    }
}
