import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import ImageCache
@testable import QemuBackend

@Suite("Guest facts kept with a saved state")
struct GuestFactsTests {
    /// An entry holding `text` as its facts, listed in its manifest with `digest`.
    func entry(_ text: String, digest: String? = nil) throws -> (StateStore.Entry, String) {
        let path = try TestPaths.makeTemporaryDirectory("dv-facts.")
        try text.write(toFile: "\(path)/\(GuestFacts.fileName)", atomically: true, encoding: .utf8)
        let digests = [GuestFacts.fileName: digest ?? SHA256.hexDigest(of: Array(text.utf8))]
        return (StateStore.Entry(key: "k", path: path, digests: digests, recorded: [:]), path)
    }

    @Test("an entry's facts count only as its manifest lists them")
    func readFromEntry() throws {
        let facts = GuestFacts(normalUser: "debci", scratch: "/tmp/autopkgtest.AbC123")
        let (listed, first) = try entry(facts.text)
        defer { TestPaths.removeTree(first) }
        #expect(GuestFacts.read(from: listed) == facts)
        // Saved again by another server since the manifest was read: another guest's facts.
        let (replaced, second) = try entry(facts.text, digest: String(repeating: "0", count: 64))
        defer { TestPaths.removeTree(second) }
        #expect(GuestFacts.read(from: replaced) == nil)
        let unlisted = StateStore.Entry(key: "k", path: first, digests: [:], recorded: [:])
        #expect(GuestFacts.read(from: unlisted) == nil)
    }

    @Test("the facts read back as written, with or without a normal user")
    func roundTrip() {
        for facts in [
            GuestFacts(normalUser: "debci", scratch: "/tmp/autopkgtest.AbC123"),
            GuestFacts(normalUser: nil, scratch: "/tmp/autopkgtest.AbC123"),
        ] {
            #expect(GuestFacts.parse(facts.text) == facts, "\(facts.text)")
        }
    }

    /// The guest wrote these values: nothing it could put there may reach a protocol reply.
    @Test("facts the guest could have bent are refused whole")
    func refused() {
        for text in [
            "", "normal-user debci\n", "scratch tmp/relative\n", "scratch /tmp/a\nscratch /tmp/b\n",
            "scratch /tmp/a\nnormal-user x\tdowntmp-host=/h\n", "scratch /tmp/a\nnormal-user Root\n",
            "scratch /tmp/a\nnormal-user a\nnormal-user b\n", "scratch /tmp/a\rb\n", "scratch /tmp/a\nmore /x\n",
            "scratch\n", "scratch /tmp/a b\n", "scratch /tmp/a%20b\n", "scratch /tmp/a\tb\n",
            "scratch /tmp/\u{e9}\n",
        ] {
            #expect(GuestFacts.parse(text) == nil, "\(text.debugDescription)")
        }
    }
}
