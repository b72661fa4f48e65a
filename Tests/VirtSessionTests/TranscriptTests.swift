import Testing
import VirtCore
import VirtTestSupport

/// Every transcript in protocol-spec/transcripts, replayed twice: through the session loop in
/// this process, and through the built `virt-fixture-server` over real pipes.
@Suite("Protocol transcripts")
struct TranscriptTests {
    static let transcripts: [Transcript] = {
        do {
            return try Transcript.load(directory: TestPaths.transcripts)
        } catch {
            Issue.record("cannot load transcripts: \(error)")
            return []
        }
    }()

    @Test("the transcript collection covers the protocol (at least 35 transcripts load)")
    func collectionLoads() {
        #expect(Self.transcripts.count >= 35)
    }

    /// Those that need a working directory of their own run only as processes: the test
    /// process's directory is shared by every test running beside this one.
    @Test(
        "each transcript replays in-process over the session loop",
        arguments: transcripts.filter { !$0.ownDirectory })
    func replayInProcess(_ transcript: Transcript) async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(parent) }
        let peer = try InProcessPeer(
            fixture: transcript.fixture + ["parent=\(parent)"], environment: transcript.environment)
        try await transcript.replay(peer, checkStandardError: false)
        #expect(TestPaths.contents(of: parent) == [], "the fixture testbed was not cleaned up")
    }

    @Test("each transcript replays through the built server over real pipes", arguments: transcripts)
    func replayThroughProcess(_ transcript: Transcript) async throws {
        let parent = try TestPaths.makeTemporaryDirectory()
        defer { TestPaths.removeTree(parent) }
        let options = (transcript.fixture + ["parent=\(parent)"]).flatMap { ["--fixture", $0] }
        let directory = transcript.ownDirectory ? try TestPaths.makeTemporaryDirectory("dv-cwd.") : nil
        defer { directory.map(TestPaths.removeTree) }
        let server = try ServerProcess(
            [TestPaths.executable("virt-fixture-server")] + options, environment: transcript.environment,
            workingDirectory: directory)
        try await transcript.replay(server, checkStandardError: true)
        #expect(TestPaths.contents(of: parent) == [], "the fixture testbed was not cleaned up")
        for file in transcript.filesInDirectory {
            var info = stat()
            #expect(
                stat("\(directory ?? ".")/\(file)", &info) == 0,
                "\(file) is not in the server's working directory: \(TestPaths.contents(of: directory ?? "."))")
        }
    }
}
