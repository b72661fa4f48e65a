import Testing

@testable import QemuBackend

@Suite("Guest facts kept with a saved state")
struct GuestFactsTests {
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
            "scratch\n",
        ] {
            #expect(GuestFacts.parse(text) == nil, "\(text.debugDescription)")
        }
    }
}
