import CommandRunner
import Foundation
import IncusBackend
import Testing
import VirtClient
import VirtCore
import VirtTestSupport

/// debusine-virt-incus on an Incus cluster: two members on this machine, each incusd in a network
/// namespace of its own (scripts/incus-cluster), reached over TLS from a client configuration
/// that has only the cluster's remotes: `dvcluster` (member m1) and `dvcluster-m2`. scripts/test
/// starts it, imports the test image as dvcluster:artifact/1 and sets DEBUSINE_VIRT_INCUS_CLUSTER
/// to the client configuration's directory.
@Suite("debusine-virt-incus on a two-member Incus cluster over TLS", .serialized)
struct IncusClusterTests {
    static let configuration = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_INCUS_CLUSTER"]
    static let enabled = configuration != nil || TestPaths.isCI
    static let remote = "dvcluster"
    static let image = "artifact/1"

    let runner = SubprocessRunner()

    func clientConfiguration() throws -> String {
        try #require(Self.configuration, "DEBUSINE_VIRT_INCUS_CLUSTER is not set: run through scripts/test")
    }

    func incus(_ arguments: [String]) throws -> Command {
        Command("incus", arguments, environment: ["INCUS_CONF": try clientConfiguration()])
    }

    func server(_ options: [String]) throws -> ServerProcess {
        try ServerProcess(
            [TestPaths.executable("debusine-virt-incus"), "--remote", Self.remote] + options + [Self.image],
            environment: ["INCUS_CONF": try clientConfiguration()])
    }

    /// The cluster's debusine-virt instances: name, member and the pid label of their server.
    func instances() async throws -> [(name: String, location: String, pid: String)] {
        let listing = try await runner.check(
            try incus(["list", "\(Self.remote):debusine-virt-", "--format", "json"]))
        let value = try JSONSerialization.jsonObject(with: Data(listing.utf8)) as? [[String: Any]] ?? []
        return value.compactMap { instance in
            guard let name = instance["name"] as? String else { return nil }
            let configuration = instance["config"] as? [String: Any] ?? [:]
            return (
                name, instance["location"] as? String ?? "",
                configuration[InstanceOwner.pidKey] as? String ?? ""
            )
        }
    }

    func instances(ownedBy pid: pid_t) async throws -> [(name: String, location: String)] {
        try await instances().filter { $0.pid == String(pid) }.map { ($0.name, $0.location) }
    }

    /// Polls until `condition` holds on the server's instances (a spare is made in the background).
    func waitForInstances(
        of pid: pid_t, _ condition: ([(name: String, location: String)]) -> Bool
    ) async throws -> [(name: String, location: String)] {
        var last: [(name: String, location: String)] = []
        for _ in 0..<600 {
            last = try await instances(ownedBy: pid)
            if condition(last) { return last }
            try await Task.sleep(for: .milliseconds(200))
        }
        return last
    }

    /// Runs `body`, then `cleanUp` whatever `body` did, then rethrows `body`'s error.
    func cleaningUp(_ body: () async throws -> Void, then cleanUp: () async -> Void) async throws {
        let outcome: Result<Void, any Error>
        do {
            try await body()
            outcome = .success(())
        } catch {
            outcome = .failure(error)
        }
        await cleanUp()
        try outcome.get()
    }

    func cluster(_ arguments: [String]) async throws {
        _ = try await runner.check(Command("\(TestPaths.repositoryRoot)/scripts/incus-cluster", arguments))
    }

    @Test(
        "the fixture package runs under autopkgtest on member m2, reached over TLS: expected summary, artifacts, nothing left",
        .enabled(if: enabled), .timeLimit(.minutes(15)))
    func fixtureOnMember() async throws {
        let work = try TestPaths.makeTemporaryDirectory("dv-cluster-autopkgtest.")
        defer { TestPaths.removeTree(work) }
        let before = Set(try await instances().map(\.name))
        let result = try await FixturePackage.run(
            server: [
                TestPaths.executable("debusine-virt-incus"), "-d", "--remote", Self.remote, "--target", "m2",
                Self.image,
            ], environment: ["INCUS_CONF": try clientConfiguration()], work: work)
        // Its debug log shows the launches on the remote, for the member asked for (the placement
        // itself is the next test's).
        let launches = result.errorText.split(separator: "\n").filter {
            $0.contains("run: incus launch \(Self.remote):\(Self.image) \(Self.remote):debusine-virt-")
        }
        #expect(!launches.isEmpty && launches.allSatisfy { $0.contains(" --target m2 ") }, "\(launches)")
        let left = try await instances().map(\.name).filter { !before.contains($0) }
        #expect(left.isEmpty, "left behind: \(left)")
    }

    @Test(
        "--target puts the instance and its spare on that member; without it the spare follows the instance",
        .enabled(if: enabled), .timeLimit(.minutes(10)))
    func placement() async throws {
        for target in ["m2", nil] {
            let server = try server(["--eager-spare"] + (target.map { ["--target", $0] } ?? []))
            #expect(try await server.readLine() == "ok")
            #expect(try await server.request("open").hasPrefix("ok /"), "\(server.standardError)")
            // The spare is made in the background, right after the open (--eager-spare).
            let both = try await waitForInstances(of: server.pid) { $0.count == 2 }
            try #require(both.count == 2, "no spare: \(both)\n\(server.standardError)")
            let members = Set(both.map(\.location))
            // Without --target the cluster places the instance; its scheduler would put a second
            // instance on the emptier member, so the spare's member is ours to choose.
            #expect(members.count == 1, "instance and spare on different members: \(both)")
            if let target { #expect(members == [target], "\(both)") }
            #expect(try await server.request("revert").hasPrefix("ok /"), "\(server.standardError)")
            #expect(server.standardError.contains("starting the spare"), "\(server.standardError)")
            let after = try await waitForInstances(of: server.pid) { $0.count == 2 }
            #expect(Set(after.map(\.location)) == members, "after the revert: \(after)")
            #expect(try await server.request("close") == "ok")
            server.write(line: "quit")
            #expect(try await server.wait() == .exited(0), "\(server.standardError)")
            #expect(try await instances(ownedBy: server.pid).isEmpty)
        }
    }

    @Test(
        "gc through another member removes instances of dead servers on every member, and only those",
        .enabled(if: enabled), .timeLimit(.minutes(5)))
    func gcAcrossMembers() async throws {
        let me = InstanceOwner.current()
        // This process's pid with another start time: a server of this machine that died and
        // whose pid was recycled. A live one is this process itself.
        let dead = InstanceOwner(host: me.host, machineID: me.machineID, pid: me.pid, startTime: "1")
        let foreign = InstanceOwner(
            host: "elsewhere", machineID: "0123456789abcdef0123456789abcdef", pid: 1, startTime: "1")
        let suffix = String(UInt32.random(in: 0..<UInt32.max), radix: 36)
        let made: [GCCase] = [
            GCCase(name: "debusine-virt-gcdead1\(suffix)", member: "m1", owner: dead, collected: true),
            GCCase(name: "debusine-virt-gcdead2\(suffix)", member: "m2", owner: dead, collected: true),
            GCCase(name: "debusine-virt-gclive\(suffix)", member: "m2", owner: me, collected: false),
            GCCase(name: "debusine-virt-gcother\(suffix)", member: "m1", owner: foreign, collected: false),
        ]
        try await cleaningUp {
            try await collectOnly(made)
        } then: {
            for instance in made {
                _ = try? await runner.run(try incus(["delete", "\(Self.remote):\(instance.name)", "--force"]))
            }
        }
    }

    struct GCCase {
        var name: String
        var member: String
        var owner: InstanceOwner
        /// Whether gc is to delete it.
        var collected: Bool
    }

    func collectOnly(_ made: [GCCase]) async throws {
        for instance in made {
            let labels = instance.owner.labels().flatMap { ["--config", "\($0.key)=\($0.value)"] }
            _ = try await runner.check(
                try incus(
                    ["init", "\(Self.remote):\(instance.name)", "--empty", "--target", instance.member] + labels))
        }
        let placed = Dictionary(uniqueKeysWithValues: try await instances().map { ($0.name, $0.location) })
        for instance in made { #expect(placed[instance.name] == instance.member, "\(placed)") }
        let gc = try await runner.run(
            Command(
                TestPaths.executable("debusine-virt-incus"), ["gc", "--remote", "\(Self.remote)-m2"],
                environment: ["INCUS_CONF": try clientConfiguration()]))
        #expect(gc.status == .exited(0), "\(gc.errorText)")
        let left = Set(try await instances().map(\.name))
        let said = gc.outputText.split(separator: "\n")
        for instance in made {
            #expect(
                left.contains(instance.name) != instance.collected, "\(instance.name) on \(instance.member): \(left)")
            let named = said.filter { $0.contains("\(Self.remote)-m2:\(instance.name) ") }
            #expect(named.count == (instance.collected ? 1 : 0), "\(said)")
        }
    }

    @Test("a --target that is not a member is a clear error before the banner", .enabled(if: enabled))
    func wrongTarget() async throws {
        let result = try await runner.run(
            Command(
                TestPaths.executable("debusine-virt-incus"), ["--remote", Self.remote, "--target", "m9", Self.image],
                environment: ["INCUS_CONF": try clientConfiguration()]))
        #expect(result.status == .exited(64), "\(result.status) \(result.errorText)")
        #expect(result.outputText.isEmpty, "a banner or more on stdout: \(result.outputText)")
        #expect(
            result.errorText.contains(
                "--target m9: the Incus remote dvcluster has no cluster member of that name (its members: m1, m2)"),
            "\(result.errorText)")
    }

    @Test(
        "a member stopped mid-session: a clear error, nothing left on the member that remains, gc cleans up once it is back",
        .enabled(if: enabled), .timeLimit(.minutes(10)))
    func memberStops() async throws {
        let server = try server(["-d", "--eager-spare", "--target", "m2"])
        #expect(try await server.readLine() == "ok")
        #expect(try await server.request("open").hasPrefix("ok /"), "\(server.standardError)")
        // Stopped once the spare is made: an `incus init` that a member's end interrupts never
        // returns, and the server then waits --boot-timeout for it (300 s).
        for _ in 0..<1500 where !server.standardError.contains("made the spare") {
            try await Task.sleep(for: .milliseconds(200))
        }
        try #require(server.standardError.contains("made the spare"), "\(server.standardError)")
        let both = try await instances(ownedBy: server.pid)
        #expect(both.count == 2 && Set(both.map(\.location)) == ["m2"], "\(both)")
        try await cluster(["stop-member", "m2"])
        try await cleaningUp {
            // The revert deletes the old instance and starts the spare, both on m2.
            server.write(line: "revert")
            let reply = try await server.readLine(timeout: .seconds(400))
            #expect(reply.map { !$0.hasPrefix("ok") } ?? true, "reply: \(reply ?? "none")")
            let status = try await server.wait(timeout: .seconds(300))
            #expect(status != .exited(0), "\(status)")
            let said = await server.standardErrorAtEnd()
            #expect(
                said.contains("is not reachable") && said.contains("debusine-virt-incus gc"),
                "not a clear error: \(said)")
            // Nothing of this server's on the member that stayed up.
            let onM1 = try await instances(ownedBy: server.pid).filter { $0.location == "m1" }
            #expect(onM1.isEmpty, "left on m1: \(onM1)")
        } then: {
            do { try await cluster(["start-member", "m2"]) } catch { Issue.record("m2 did not start again: \(error)") }
        }
        // Once m2 is back, gc removes what the dead server left there.
        var left = try await instances(ownedBy: server.pid)
        for _ in 0..<60 where !left.isEmpty {
            _ = try await runner.run(
                Command(
                    TestPaths.executable("debusine-virt-incus"), ["gc", "--remote", Self.remote],
                    environment: ["INCUS_CONF": try clientConfiguration()]))
            left = try await instances(ownedBy: server.pid)
            if !left.isEmpty { try await Task.sleep(for: .seconds(2)) }
        }
        #expect(left.isEmpty, "left after gc: \(left)")
    }

    @Test(
        "setup defines a new network on every member, then creates it, also after an interrupted setup; --check agrees",
        .enabled(if: enabled))
    func setupOnCluster() async throws {
        let tool = TestPaths.executable("debusine-virt-incus")
        let environment: [String: String?] = ["INCUS_CONF": try clientConfiguration()]
        let options = [
            "--remote", Self.remote, "--network", "dvcltest0", "--profile", "debusine-virt-cluster-test",
            "--ipv4-address", "none",
        ]
        try await cleaningUp {
            try await setUp(tool: tool, options: options, environment: environment)
        } then: {
            for arguments in [
                ["profile", "delete", "\(Self.remote):debusine-virt-cluster-test"],
                ["network", "delete", "\(Self.remote):dvcltest0"],
            ] {
                _ = try? await runner.run(try incus(arguments))
            }
        }
    }

    func setUp(tool: String, options: [String], environment: [String: String?]) async throws {
        // As a `setup` interrupted after its first step leaves it: defined on m1 only.
        _ = try await runner.check(try incus(["network", "create", "\(Self.remote):dvcltest0", "--target", "m1"]))
        let before = try await runner.run(Command(tool, ["setup", "--check"] + options, environment: environment))
        #expect(before.status == .exited(1), "\(before.outputText)")
        #expect(before.outputText.contains("missing: network dvcltest0"), "\(before.outputText)")
        let first = try await runner.run(Command(tool, ["setup"] + options, environment: environment))
        #expect(first.status == .exited(0), "\(first.errorText)")
        #expect(first.outputText.contains("set up network dvcltest0"), "\(first.outputText)")
        let check = try await runner.run(Command(tool, ["setup", "--check"] + options, environment: environment))
        #expect(check.outputText == "everything is set up", "\(check.outputText)")
        for member in ["m1", "m2"] {
            let shown = try await runner.check(
                try incus(["network", "show", "\(Self.remote):dvcltest0", "--target", member]))
            #expect(shown.contains("status: Created"), "\(member): \(shown)")
        }
    }
}
