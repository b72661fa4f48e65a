import CommandRunner
import Foundation
import Synchronization
import Testing
import VirtCore
import VirtTestSupport

@testable import IncusBackend

@Suite("Incus commands, names, labels and metadata")
struct IncusUnitTests {
    @Test("launch asks for an ephemeral instance with the profiles, labels, target and extra arguments in order")
    func launchArgv() {
        let cli = IncusCLI(remote: "worker")
        let launch = IncusCLI.Launch(
            image: "artifact/42", name: "debusine-virt-abc", profiles: ["debusine", "extra"], virtualMachine: true,
            target: "member2", configuration: [("user.a", "1"), ("user.b", "x y")],
            extraArguments: ["-c", "limits.cpu=2"])
        #expect(
            cli.launch(launch).argv == [
                "incus", "launch", "worker:artifact/42", "worker:debusine-virt-abc", "--ephemeral", "--quiet",
                "--profile", "debusine", "--profile", "extra", "--vm", "--target", "member2", "--config", "user.a=1",
                "--config", "user.b=x y", "-c", "limits.cpu=2",
            ])
        #expect(cli.launch(launch).environment["LC_ALL"] == "C")
        // A spare is the same instance, made and not started; a revert starts it.
        #expect(cli.initialise(launch).argv == ["incus", "init"] + cli.launch(launch).argv.dropFirst(2))
        #expect(cli.start("debusine-virt-abc").argv == ["incus", "start", "worker:debusine-virt-abc", "--quiet"])
    }

    @Test("every instance and image command addresses the remote, and none without one")
    func remoteEverywhere() {
        let remote = IncusCLI(remote: "r")
        let local = IncusCLI()
        #expect(remote.exec("n", ["true"]).argv == ["incus", "exec", "--force-noninteractive", "r:n", "--", "true"])
        #expect(local.exec("n", ["true"]).argv == ["incus", "exec", "--force-noninteractive", "n", "--", "true"])
        #expect(remote.stop("n", timeout: 30).argv == ["incus", "stop", "r:n", "--timeout", "30"])
        #expect(remote.forceStop("n").argv == ["incus", "stop", "r:n", "--force"])
        #expect(remote.delete("n").argv == ["incus", "delete", "r:n", "--force"])
        #expect(
            remote.list(prefix: "debusine-virt-").argv == ["incus", "list", "r:debusine-virt-", "--format", "json"])
        #expect(remote.list().argv == ["incus", "list", "r:", "--format", "json"])
        #expect(local.list().argv == ["incus", "list", "--format", "json"])
        #expect(remote.imageInfo("artifact/1").argv == ["incus", "image", "info", "r:artifact/1"])
        #expect(
            remote.imageImport(["/x.tar"], alias: "artifact/1").argv == [
                "incus", "image", "import", "/x.tar", "r:", "--alias", "artifact/1", "--quiet",
            ])
        #expect(remote.configGet("n", "user.k").argv == ["incus", "config", "get", "r:n", "user.k"])
        #expect(
            remote.interactive("n", directory: "/tmp/x y", environment: ["A=1"], ["bash", "-l"]).argv == [
                "incus", "exec", "--force-interactive", "--cwd", "/tmp/x y", "--env", "A=1", "r:n", "--", "bash", "-l",
            ])
    }

    @Test("instance names are valid for Incus and do not repeat")
    func names() {
        let names = (0..<2000).map { _ in InstanceName.make() }
        #expect(Set(names).count == names.count)
        #expect(names.allSatisfy(InstanceName.isValid))
        #expect(names.allSatisfy { $0.hasPrefix(InstanceName.prefix) && $0.count <= 63 })
        for invalid in ["", "1abc", "-abc", "abc-", "a_b", "a b", "ä", String(repeating: "a", count: 64)] {
            #expect(!InstanceName.isValid(invalid), "\(invalid)")
        }
    }

    @Test("owner labels round-trip, and a dead or recycled pid is not a live owner")
    func owner() {
        let me = InstanceOwner.current()
        #expect(me.isAlive)
        let configuration = Dictionary(uniqueKeysWithValues: me.labels(launched: 7).map { ($0.key, $0.value) })
        #expect(InstanceOwner(configuration: configuration) == me)
        #expect(configuration[InstanceOwner.launchedKey] == "7")
        #expect(InstanceOwner(configuration: ["user.other": "1"]) == nil)
        var recycled = me
        recycled.startTime = "1"
        #expect(!recycled.isAlive)
        let dead = InstanceOwner(host: me.host, pid: Int32.max - 1, startTime: "5")
        #expect(!dead.isAlive)
    }

    @Test("metadata.yaml quotes every string, maps the architecture and has both templates")
    func metadata() {
        let metadata = ImageMetadata(
            debianArchitecture: "arm64", os: "Debian", release: "trixie", artifactID: "42",
            description: "evil\"\nkey: value \\ ü", creationDate: 1_700_000_000)
        let yaml = metadata.yaml(incusArchitecture: "aarch64")
        #expect(yaml.contains("architecture: \"aarch64\"\n"))
        #expect(yaml.contains("creation_date: 1700000000\n"))
        #expect(yaml.contains("  description: \"evil\\\"\\nkey: value \\\\ ü\"\n"))
        #expect(yaml.contains("  artifact_id: \"42\"\n"))
        #expect(yaml.contains("  architecture: \"arm64\"\n"))
        #expect(
            yaml.contains(
                "  /etc/hostname:\n    when:\n    - create\n    - copy\n    create_only: false\n    template: hostname.tpl\n"
            ))
        #expect(yaml.contains("  /etc/hosts:\n"))
        #expect(
            !ImageMetadata(
                debianArchitecture: "amd64", os: "Debian", release: "x", artifactID: "1", creationDate: 1,
                withTemplates: false
            ).yaml(incusArchitecture: "x86_64").contains("templates"))
        #expect(ImageMetadata.hostnameTemplate == "{{ instance.name }}\n")
        #expect(ImageMetadata.hostsTemplate.hasPrefix("127.0.1.1 {{ instance.name }}\n127.0.0.1 localhost\n"))
    }

    @Test("Debian architectures map to Incus names, and ELF headers to Debian architectures")
    func architectures() throws {
        #expect(Architecture.incusName(debian: "amd64") == "x86_64")
        #expect(Architecture.incusName(debian: "armhf") == "armv7l")
        #expect(Architecture.incusName(debian: "ppc64el") == "ppc64le")
        #expect(Architecture.incusName(debian: "loong64") == "loongarch64")
        #expect(Architecture.incusName(debian: "nonsense") == nil)
        let shell = try Data(contentsOf: URL(fileURLWithPath: "/bin/sh")).prefix(64)
        #expect(Architecture.debian(elfHeader: Array(shell)) == "amd64")
        var arm = [UInt8](repeating: 0, count: 64)
        arm.replaceSubrange(0..<6, with: [0x7f, 0x45, 0x4c, 0x46, 1, 1])
        arm[18] = 0x28
        #expect(Architecture.debian(elfHeader: arm) == "armel")
        arm[37] = 0x04
        #expect(Architecture.debian(elfHeader: arm) == "armhf")
        #expect(Architecture.debian(elfHeader: Array("#!/bin/sh\n".utf8) + arm) == nil)
    }

    @Test("os-release values are read with and without quotes")
    func osRelease() {
        let fields = ImageMetadata.parseOSRelease(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME='Debian GNU/Linux'\nVERSION_CODENAME=bookworm\n# c\n")
        #expect(fields["VERSION_CODENAME"] == "bookworm")
        #expect(fields["NAME"] == "Debian GNU/Linux")
        #expect(fields["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)")
    }

    @Test("boot states: booted, still booting, agent or bus not ready yet, no systemd, instance gone")
    func bootStates() {
        func state(_ out: String, _ err: String = "", _ code: Int32 = 0) -> BootState {
            BootState(
                CommandResult(status: .exited(code), standardOutput: Array(out.utf8), standardError: Array(err.utf8)))
        }
        #expect(state("running\n") == .booted)
        #expect(state("degraded\n", "", 1) == .booted)
        #expect(state("maintenance\n", "", 1) == .booted)
        #expect(state("starting\n", "", 1) == .waiting("starting"))
        #expect(state("", "Failed to connect to bus: No such file or directory", 1) != .booted)
        #expect(state("", "Error: VM agent isn't currently running", 1) != .booted)
        #expect(state("", "", 127) == .noSystemd)
        if case .gone = state("", "Error: Instance not found", 1) {} else { Issue.record("not gone") }
    }

    @Test("setup creates network, pool and the debusine profile exactly as the design says")
    func setupRequirements() {
        var options = IncusSetup.Options()
        options.ipv4Address = "none"
        let setup = IncusSetup(options: options, runner: SubprocessRunner())
        let fixes = setup.requirements.flatMap(\.fix).map(\.argv)
        #expect(fixes.contains(["incus", "storage", "create", "default", "dir"]))
        #expect(
            fixes.contains(["incus", "network", "create", "debusinebr0", "ipv4.address=none", "ipv6.address=none"]))
        #expect(fixes.contains(["incus", "profile", "create", "debusine"]))
        #expect(fixes.contains(["incus", "profile", "set", "debusine", "raw.lxc=lxc.mount.auto=sys"]))
        #expect(fixes.contains(["incus", "profile", "set", "debusine", "security.secureboot=false"]))
        #expect(
            fixes.contains([
                "incus", "profile", "device", "add", "debusine", "eth0", "nic", "name=host0", "network=debusinebr0",
            ]))
        #expect(
            fixes.contains(["incus", "profile", "device", "add", "debusine", "root", "disk", "path=/", "pool=default"]))
    }
}

@Suite("import --vm: what a VM image tarball may hold")
struct VirtualMachineImportUnitTests {
    @Test("the member is listed, then its stored bytes extracted to stdout: tar makes no file, link or device")
    func tarArgv() {
        #expect(ImageImport.listMembers("/a/b.tar", verbose: false).argv == ["tar", "--list", "--file", "/a/b.tar"])
        #expect(
            ImageImport.listMembers("/a/b.tar", verbose: true).argv == [
                "tar", "--list", "--verbose", "--file", "/a/b.tar",
            ])
        #expect(
            ImageImport.extractMember("/a/b.tar", "-disk.img").argv == [
                "tar", "--extract", "--to-stdout", "--file", "/a/b.tar", "--", "-disk.img",
            ])
    }

    @Test("links, devices and FIFOs are told from regular files by tar's verbose listing, naming a link's target")
    func memberKinds() {
        #expect(ImageImport.nonRegularKind("-rw-r--r-- root/root 16777216 2026-12-02 05:25 disk.raw") == nil)
        #expect(
            ImageImport.nonRegularKind("lrwxrwxrwx root/root 0 2026-12-02 05:25 disk.img -> /etc/shadow")
                == "a symbolic link (to /etc/shadow)")
        #expect(
            ImageImport.nonRegularKind("hrw-r--r-- 0/0 0 1970-01-01 00:00 disk.img link to etc/shadow")
                == "a hard link (to etc/shadow)")
        #expect(ImageImport.nonRegularKind("brw-r--r-- 0/0 8,0 1970-01-01 00:00 disk.img") == "a block device")
        #expect(ImageImport.nonRegularKind("crw-r--r-- 0/0 1,3 1970-01-01 00:00 disk.img") == "a character device")
        #expect(ImageImport.nonRegularKind("prw-r--r-- 0/0 0 1970-01-01 00:00 disk.img") == "a FIFO")
    }
}

/// Answers `incus image info` and `incus query /1.0` with canned text and records what ran:
/// the architecture check's error paths without a foreign host.
final class CannedIncus: CommandRunner {
    let imageInfo: String
    let serverInfo: String
    let queryFails: Bool
    let ran = Mutex<[[String]]>([])

    init(imageArchitecture: String, hostArchitectures: [String], clustered: Bool = false, queryFails: Bool = false) {
        // The lower-case property first: only the top-level line is the architecture.
        imageInfo = "Fingerprint: 94db\nProperties:\n    architecture: ignored\nArchitecture: \(imageArchitecture)\n"
        let names = hostArchitectures.map { "\"\($0)\"" }.joined(separator: ", ")
        serverInfo =
            #"{"environment": {"server_clustered": "# + "\(clustered), " + #""architectures": ["# + names + "]}}"
        self.queryFails = queryFails
    }

    func run(
        _ command: Command, input: CommandInput, output: CommandOutput, error: CommandOutput
    ) async throws(VirtError) -> CommandResult {
        ran.withLock { $0.append(command.argv) }
        if command.arguments.first == "query" && queryFails {
            return CommandResult(status: .exited(1), standardError: Array("Error: not authorized".utf8))
        }
        let text = command.arguments.first == "query" ? serverInfo : command.arguments.first == "image" ? imageInfo : ""
        return CommandResult(status: .exited(0), standardOutput: Array(text.utf8), standardError: [])
    }
}

@Suite("The Incus server must run the image's architecture")
struct IncusArchitectureTests {
    func options(remote: String? = nil, target: String? = nil) -> IncusOptions {
        var options = IncusOptions(image: "artifact/42", auxverbExecutable: "/usr/bin/debusine-virt-auxverb")
        options.cli = IncusCLI(remote: remote)
        options.target = target
        options.profiles = []
        return options
    }

    @Test("an arm64 image on an x86_64 host fails before the banner, naming both architectures")
    func foreignImage() async throws {
        let runner = CannedIncus(imageArchitecture: "aarch64", hostArchitectures: ["x86_64", "i686"])
        let error = await #expect(throws: VirtError.self) { try await IncusPreflight.check(options(), runner: runner) }
        #expect(error?.code == .unavailable)
        #expect(
            error?.message
                == "the image artifact/42 is for arm64 (aarch64), which the Incus server cannot run: it runs "
                + "amd64 (x86_64), i386 (i686); use a host of that architecture")
        #expect(runner.ran.withLock { $0.last } == ["incus", "query", "/1.0"])
    }

    @Test("an i386 image on a host that runs i686 passes; so does an image of the host's own architecture, unasked")
    func runnableImages() async throws {
        let i386 = CannedIncus(imageArchitecture: "i686", hostArchitectures: ["x86_64", "i686"])
        try await IncusPreflight.check(options(), runner: i386)
        #expect(i386.ran.withLock { $0.contains(["incus", "query", "/1.0"]) })
        let native = CannedIncus(imageArchitecture: Host.machine, hostArchitectures: [])
        try await IncusPreflight.check(options(), runner: native)
        #expect(native.ran.withLock { $0 } == [["incus", "image", "info", "artifact/42"]])
    }

    @Test("on a remote the remote is asked, whatever this machine runs; with --target, that member")
    func remoteIsAsked() async throws {
        let runner = CannedIncus(imageArchitecture: Host.machine, hostArchitectures: ["riscv64"])
        let error = await #expect(throws: VirtError.self) {
            try await IncusPreflight.check(options(remote: "far"), runner: runner)
        }
        #expect(error?.message.contains("which the Incus remote far cannot run: it runs riscv64;") == true)
        #expect(runner.ran.withLock { $0.last } == ["incus", "query", "far:/1.0"])

        let member = CannedIncus(imageArchitecture: "aarch64", hostArchitectures: ["x86_64"], clustered: true)
        let refused = await #expect(throws: VirtError.self) {
            try await IncusPreflight.check(options(remote: "far", target: "node 2&x"), runner: member)
        }
        #expect(refused?.message.contains("the Incus remote far (member node 2&x) cannot run") == true)
        // Asked once: the check of the member and that of its architectures share the answer.
        #expect(
            member.ran.withLock { $0 }.filter { $0.dropFirst().first == "query" }
                == [["incus", "query", "far:/1.0?target=node%202%26x"]])
    }

    @Test("a cluster asked without --target, a query that fails and an answer without architectures let open decide")
    func undecided() async throws {
        let cluster = CannedIncus(imageArchitecture: "aarch64", hostArchitectures: ["x86_64"], clustered: true)
        try await IncusPreflight.check(options(remote: "far"), runner: cluster)
        let failing = CannedIncus(imageArchitecture: "aarch64", hostArchitectures: ["x86_64"], queryFails: true)
        try await IncusPreflight.check(options(), runner: failing)
        let silent = CannedIncus(imageArchitecture: "aarch64", hostArchitectures: [])
        try await IncusPreflight.check(options(), runner: silent)
        for runner in [cluster, failing, silent] {
            #expect(runner.ran.withLock { $0.contains { $0.dropFirst().first == "query" } })
        }
    }
}

/// Answers each `incus` command through `answer` (arguments → status, stdout, stderr) and
/// records the argv.
final class ScriptedIncus: CommandRunner {
    let answer: @Sendable ([String]) -> (Int32, String, String)
    let ran = Mutex<[[String]]>([])

    init(_ answer: @escaping @Sendable ([String]) -> (Int32, String, String)) { self.answer = answer }

    func run(
        _ command: Command, input: CommandInput, output: CommandOutput, error: CommandOutput
    ) async throws(VirtError) -> CommandResult {
        ran.withLock { $0.append(command.argv) }
        let (status, out, err) = answer(command.arguments)
        return CommandResult(status: .exited(status), standardOutput: Array(out.utf8), standardError: Array(err.utf8))
    }
}

@Suite("gc with an incusd that refuses")
struct IncusGarbageCollectorUnitTests {
    @Test(
        "a delete refused until gc's patience ends is reported with incusd's words, and the next orphan is still deleted"
    )
    func goesOnPastARefusal() async throws {
        let host = InstanceOwner.current()
        // Dead owners on this machine: pids that do not run.
        @Sendable func instance(_ name: String, pid: Int32) -> String {
            let labels = InstanceOwner(host: host.host, machineID: host.machineID, pid: pid, startTime: "1").labels()
            let config = labels.map { #""\#($0.key)": "\#($0.value)""# }.joined(separator: ", ")
            return #"{"name": "\#(name)", "config": {\#(config)}}"#
        }
        let stuck = "debusine-virt-stuck", gone = "debusine-virt-gone"
        let list = "[\(instance(stuck, pid: Int32.max - 7)), \(instance(gone, pid: Int32.max - 9))]"
        let deleted = Mutex<Set<String>>([])
        let runner = ScriptedIncus { arguments in
            switch arguments.first {
            case "list":
                // The listing of one name (after a refusal) says whether it is still there.
                let name = arguments.dropFirst().first ?? ""
                if name == stuck || name == gone {
                    return (0, deleted.withLock { $0.contains(name) } ? "[]" : "[\(instance(name, pid: 1))]", "")
                }
                return (0, list, "")
            case "delete" where arguments.dropFirst().first == stuck:
                return (1, "", "Error: Failed deleting instance: boom")
            case "delete":
                deleted.withLock { _ = $0.insert(arguments.dropFirst().first ?? "") }
                return (0, "", "")
            default:
                return (1, "", "Error: unexpected")
            }
        }
        // Nothing of the host's $TMPDIR: other tests' relay directories are theirs to check.
        let relayParent = try TestPaths.makeTemporaryDirectory("dv-gc-unit.")
        defer { TestPaths.removeTree(relayParent) }
        let started = ContinuousClock.now
        let report = try await IncusGarbageCollector(runner: runner, patience: .seconds(5))
            .collect(relayParent: relayParent)
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(
            report == [
                "could not delete instance \(stuck): Error: Failed deleting instance: boom",
                "deleted instance \(gone) (its server, pid \(Int32.max - 9), is gone)",
            ], "\(report)")
        let tries = runner.ran.withLock { $0 }.filter { $0 == ["incus", "delete", stuck, "--force"] }.count
        // At 0, 1, 2 and perhaps 3 s: not at the deadline, with no time left for an answer.
        #expect((2...4).contains(tries), "a refused delete is tried again within gc's patience: \(tries) tries")
    }
}

@Suite("Incus clusters: setup on every member, --target checked, members that go away")
struct IncusClusterUnitTests {
    @Test("on a cluster, setup defines pool and network on each member (--target), then creates them")
    func setupOnMembers() async throws {
        var options = IncusSetup.Options(cli: IncusCLI(remote: "c"))
        options.ipv4Address = "none"
        let runner = ScriptedIncus { arguments in
            switch arguments.first {
            case "query": return (0, #"["/1.0/cluster/members/m1", "/1.0/cluster/members/node%202"]"#, "")
            case "storage" where arguments.dropFirst().first == "show",
                "network" where arguments.dropFirst().first == "show",
                "profile" where arguments.dropFirst().first == "show":
                return (1, "", "Error: not found")
            default: return (0, "", "")
            }
        }
        let setup = IncusSetup(options: options, runner: runner)
        #expect(try await setup.members() == ["m1", "node 2"])
        _ = try await setup.apply()
        let creates = runner.ran.withLock { $0 }.filter { $0.dropFirst(2).first == "create" }
        #expect(
            creates.prefix(6) == [
                ["incus", "storage", "create", "c:default", "dir", "--target", "m1"],
                ["incus", "storage", "create", "c:default", "dir", "--target", "node 2"],
                ["incus", "storage", "create", "c:default", "dir"],
                ["incus", "network", "create", "c:debusinebr0", "--target", "m1"],
                ["incus", "network", "create", "c:debusinebr0", "--target", "node 2"],
                ["incus", "network", "create", "c:debusinebr0", "ipv4.address=none", "ipv6.address=none"],
            ], "\(creates)")
        // Not clustered: one step each, as before.
        let single = ScriptedIncus { arguments in
            arguments.first == "query" ? (1, "", "Error: Server is not clustered") : (0, "", "")
        }
        #expect(try await IncusSetup(options: options, runner: single).members().isEmpty)
        #expect(
            IncusSetup(options: options).requirements(members: []).flatMap(\.fix).map(\.argv).contains([
                "incus", "storage", "create", "c:default", "dir",
            ]))
    }

    func options(target: String) -> IncusOptions {
        var options = IncusOptions(image: "artifact/42", auxverbExecutable: "/usr/bin/debusine-virt-auxverb")
        options.cli = IncusCLI(remote: "c")
        options.target = target
        options.profiles = []
        return options
    }

    @Test("a --target that is no member, or on a server that is not clustered, is a usage error naming the members")
    func wrongTarget() async throws {
        let cluster = ScriptedIncus { arguments in
            if arguments == ["query", "c:/1.0?target=m9"] { return (1, "", "Error: Cluster member not found") }
            if arguments == ["query", "c:/1.0/cluster/members"] {
                return (0, #"["/1.0/cluster/members/m1","/1.0/cluster/members/m2"]"#, "")
            }
            return (0, "Architecture: \(Host.machine)\n", "")
        }
        let error = await #expect(throws: VirtError.self) {
            try await IncusPreflight.check(options(target: "m9"), runner: cluster)
        }
        #expect(error?.code == .usage)
        #expect(
            error?.message
                == "--target m9: the Incus remote c has no cluster member of that name (its members: m1, m2)")
        let single = ScriptedIncus { arguments in
            if arguments == ["query", "c:/1.0?target=m1"] { return (1, "", "Error: Cluster member not found") }
            if arguments == ["query", "c:/1.0/cluster/members"] { return (1, "", "Error: Server is not clustered") }
            return (0, "Architecture: \(Host.machine)\n", "")
        }
        let notClustered = await #expect(throws: VirtError.self) {
            try await IncusPreflight.check(options(target: "m1"), runner: single)
        }
        #expect(notClustered?.message == "--target m1: the Incus remote c is not clustered; leave --target out")
    }

    @Test("an `incus launch` that never returns (its member gone mid-operation) fails open after --boot-timeout")
    func launchThatNeverReturns() async throws {
        let runner = HangingLaunch()
        var options = IncusOptions(image: "artifact/42", auxverbExecutable: "/usr/bin/debusine-virt-auxverb")
        options.cli = IncusCLI(remote: "c")
        options.bootTimeout = .seconds(1)
        options.spare = false
        let testbed = IncusTestbed(options: options, runner: runner)
        let started = ContinuousClock.now
        let error = await #expect(throws: VirtError.self) { _ = try await testbed.open() }
        #expect(error?.code == .timeout, "\(String(describing: error))")
        #expect(
            error?.message.contains("`incus launch c:artifact/42 c:debusine-virt-") == true,
            "\(String(describing: error))")
        #expect(ContinuousClock.now - started < .seconds(60))
        // The launch was stopped, and what incusd may still make under the name is looked after.
        let ran = runner.ran.withLock { $0 }
        #expect(runner.cancelled.withLock { $0 } == 1, "\(ran)")
        #expect(ran.contains { $0.starts(with: ["incus", "config", "get"]) }, "\(ran)")
        #expect(testbed.instanceName == nil)
    }

    @Test("a TLS remote or member that does not answer is named by its address; a unix socket is incusd not running")
    func unreachable() {
        let refused =
            #"Error: Post "https://198.51.100.2:8443/1.0/instances?target=m2": Unable to connect to: "#
            + "198.51.100.2:8443 ([dial tcp 198.51.100.2:8443: connect: connection refused])"
        #expect(IncusErrors.unreachableAddress(refused) == "198.51.100.2:8443")
        let command = IncusCLI(remote: "c").start("n")
        let error = IncusErrors.describe(
            command, CommandResult(status: .exited(1), standardError: Array(refused.utf8)))
        #expect(error.code == .unavailable)
        #expect(error.message.hasPrefix("the Incus server at 198.51.100.2:8443 is not reachable"), "\(error.message)")
        let gone = "Error: Missing event connection with target cluster member"
        #expect(
            IncusErrors.describe(command, CommandResult(status: .exited(1), standardError: Array(gone.utf8))).message
                .hasPrefix("a member of the Incus cluster is not reachable"))
        let local =
            "Error: Get \"http://unix.socket/1.0\": dial unix /var/lib/incus/unix.socket: connect: connection refused"
        #expect(IncusErrors.unreachableAddress(local) == nil)
        #expect(
            IncusErrors.describe(command, CommandResult(status: .exited(1), standardError: Array(local.utf8))).message
                .hasPrefix("incusd is not running"))
        #expect(
            IncusCLI(remote: "c").instanceInfo("debusine-virt-a b").argv == [
                "incus", "query", "c:/1.0/instances/debusine-virt-a%20b",
            ])
    }
}

/// An `incus launch` that never returns until cancelled; every other command succeeds saying
/// nothing (so the instance is not this server's: no pid label).
final class HangingLaunch: CommandRunner {
    let ran = Mutex<[[String]]>([])
    let cancelled = Mutex(0)

    func run(
        _ command: Command, input: CommandInput, output: CommandOutput, error: CommandOutput
    ) async throws(VirtError) -> CommandResult {
        ran.withLock { $0.append(command.argv) }
        if command.arguments.first == "launch" {
            do {
                try await Task.sleep(for: .seconds(600))
            } catch {
                cancelled.withLock { $0 += 1 }
                throw VirtError(.timeout, "`\(command)` was cancelled")
            }
        }
        let text = command.arguments.first == "list" ? "[]" : ""
        return CommandResult(status: .exited(0), standardOutput: Array(text.utf8), standardError: [])
    }
}
