import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

@testable import IncusBackend

/// debusine-virt-incus's command line as autopkgtest-virt-incus's (autopkgtest 5.49's
/// autopkgtest-virt-lxd): launch arguments after the image, merged with what the server sets.
@Suite("debusine-virt-incus takes autopkgtest-virt-incus's command line")
struct IncusCommandLineTests {
    let runner = SubprocessRunner()

    func merge(
        _ arguments: [String], profiles: [String] = ["debusine"], vm: Bool = false, target: String? = nil
    ) throws -> LaunchArguments {
        try LaunchArguments.merge(arguments, profiles: profiles, virtualMachine: vm, target: target)
    }

    @Test("the profile the server sets, given again in any spelling, is merged: debusine's `-- --profile debusine`")
    func profileMerged() throws {
        for arguments in [
            ["--profile", "debusine"], ["-p", "debusine"], ["--profile=debusine"], ["-pdebusine"], ["-p=debusine"],
            ["--profile", "debusine", "-p", "debusine"],
        ] {
            let merged = try merge(arguments)
            #expect(merged.profiles == ["debusine"], "\(arguments)")
            #expect(merged.extraArguments.isEmpty, "\(arguments)")
        }
        // A profile of the server's own --profile list is merged the same way.
        let own = try merge(["-p", "b", "-p", "c"], profiles: ["a", "b"])
        #expect(own.profiles == ["a", "b", "c"])
        #expect(own.extraArguments.isEmpty)
    }

    @Test("--ephemeral, -e, --quiet, --vm and the same --target are merged; -c pairs given twice are given once")
    func otherMerges() throws {
        let merged = try merge(["--ephemeral", "-e", "-q", "--quiet", "-c", "limits.cpu=2", "--config=limits.cpu=2"])
        #expect(merged.extraArguments == ["-c", "limits.cpu=2"])
        let vm = try merge(["--vm"])
        #expect(vm.virtualMachine && vm.extraArguments.isEmpty)
        #expect(try merge(["--vm"], vm: true).virtualMachine)
        let target = try merge(["--target", "m1"], target: "m1")
        #expect(target.target == "m1" && target.extraArguments.isEmpty)
        // A --target only in the launch arguments becomes the server's, for spares as well.
        let only = try merge(["--target=m2"])
        #expect(only.target == "m2" && only.extraArguments.isEmpty)
        // A cluster of short flags: -e and -p merged.
        let cluster = try merge(["-ep", "debusine"])
        #expect(cluster.profiles == ["debusine"] && cluster.extraArguments.isEmpty)
        let partial = try merge(["-ep", "other"])
        #expect(partial.profiles == ["debusine", "other"] && partial.extraArguments.isEmpty)
        let conflict = #expect(throws: VirtError.self) { try merge(["--target", "b"], target: "a") }
        #expect(conflict?.message.contains("--target a and the launch argument --target b disagree") == true)
    }

    @Test("other launch arguments pass through as given and in order, values that look like flags included")
    func passThrough() throws {
        let arguments = [
            "-c", "limits.memory=2GiB", "--storage", "pool2", "-n", "br1", "-d", "root,size=10GiB", "--description",
            "--vm", "-sfast", "--type=c2-m4", "--force-local", "--", "x",
        ]
        let merged = try merge(arguments)
        // "--vm" here is the value of --description, not a flag.
        #expect(!merged.virtualMachine)
        #expect(merged.extraArguments == arguments)
        #expect(merged.profiles == ["debusine"])
        // A profile that is not the server's is added after its own.
        #expect(try merge(["--profile", "gpu"]).profiles == ["debusine", "gpu"])
        // Unknown flags are incus's to refuse.
        #expect(try merge(["--bogus", "-zq"]).extraArguments == ["--bogus", "-zq"])
    }

    @Test(
        "launch arguments the server cannot honour are refused before the banner, saying why",
        arguments: [
            (["--console"], "--console is not supported"),
            (["--console=vga"], "--console is not supported"),
            (["--empty"], "--empty is not supported"),
            (["--no-profiles"], "--no-profiles is not supported"),
            (["--project", "p"], "--project is not supported"),
            (["-h"], "--help is not supported"),
            (["-c", "user.debusine-virt.pid=1"], "sets a label of the server's own"),
            (["--ephemeral=false"], "--ephemeral=false is not supported"),
        ])
    func refusedLaunchArguments(_ arguments: [String], _ message: String) throws {
        let error = #expect(throws: VirtError.self) { try merge(arguments) }
        #expect(error?.code == .usage)
        #expect(error?.message.contains(message) == true, "\(String(describing: error))")
    }

    @Test("launch and spare (init) argv: the server's flags once, then what passes through")
    func mergedArgv() throws {
        let merged = try merge(["--profile", "debusine", "-c", "limits.cpu=2", "--vm"])
        let launch = IncusCLI.Launch(
            image: "artifact/7", name: "debusine-virt-x", profiles: merged.profiles,
            virtualMachine: merged.virtualMachine, target: merged.target, configuration: [("user.a", "1")],
            extraArguments: merged.extraArguments)
        let cli = IncusCLI()
        #expect(
            cli.launch(launch).argv == [
                "incus", "launch", "artifact/7", "debusine-virt-x", "--ephemeral", "--quiet", "--profile", "debusine",
                "--vm", "--config", "user.a=1", "-c", "limits.cpu=2",
            ])
        #expect(cli.initialise(launch).argv == ["incus", "init"] + cli.launch(launch).argv.dropFirst(2))
    }

    @Test("debusine's `artifact/ID -- --profile debusine`: every launch and spare has the profile once, and the rest")
    func debusineArgumentsWithFake() async throws {
        for before in [[String](), ["--vm"]] {
            let fake = try FakeIncusTests.Fake(
                "", before, after: ["--", "--profile", "debusine", "-c", "limits.cpu=2"])
            defer { fake.cleanUp() }
            #expect(try await fake.server.readLine() == "ok", "\(fake.server.standardError)")
            #expect(try await fake.request("open")?.hasPrefix("ok /") == true, "\(fake.server.standardError)")
            let capabilities = try #require(try await fake.request("capabilities"))
            #expect(capabilities.contains(before.isEmpty ? "isolation-container" : "isolation-machine"))
            #expect(try await fake.request("revert")?.hasPrefix("ok /") == true, "\(fake.server.standardError)")
            #expect(try await fake.request("close") == "ok")
            #expect(try await fake.request("quit") == nil)
            #expect(try await fake.server.wait() == .exited(0))
            let made = fake.calls.filter { $0.hasPrefix("launch ") || $0.hasPrefix("init ") }
            #expect(made.count >= 2, "a launch and at least one spare: \(fake.calls)")
            for call in made {
                let words = call.split(separator: " ")
                #expect(words.filter { $0 == "--profile" }.count == 1, "\(call)")
                #expect(words.filter { $0 == "--ephemeral" }.count == 1, "\(call)")
                #expect(words.filter { $0 == "--vm" }.count == (before.isEmpty ? 0 : 1), "\(call)")
                #expect(call.hasSuffix(" -c limits.cpu=2"), "\(call)")
            }
        }
    }

    @Test("-d, -r, --incus and launch arguments without `--` are accepted; a trailing `:` of the remote is its own")
    func acceptedForms() async throws {
        let fake = try FakeIncusTests.Fake("", ["-d", "-r", "r:", "--incus"], after: ["-p", "debusine", "-e"])
        defer { fake.cleanUp() }
        #expect(try await fake.server.readLine() == "ok", "\(fake.server.standardError)")
        #expect(try await fake.request("quit") == nil)
        #expect(try await fake.server.wait() == .exited(0))
        #expect(fake.calls.contains("image info r:artifact/1"), "\(fake.calls)")
        let line = "instances are made as: incus launch r:artifact/1 r:NAME --ephemeral --quiet --profile debusine\n"
        let standardError = await fake.server.standardError(containing: line)
        #expect(standardError.contains(line), "\(standardError)")
    }

    @Test(
        "--lxd and launch arguments the server cannot honour fail before the banner, never as unknown options",
        arguments: [
            (["--lxd"], [String](), Int32(69), "--lxd is not supported: debusine-virt-incus runs Incus only"),
            ([], ["--", "--console"], 64, "the launch argument --console is not supported"),
            (["--target", "a"], ["--target", "b"], 64, "disagree"),
            (
                ["--statistics-file", "/nonexistent/statistics.json"], [], 69,
                "cannot write the statistics file /nonexistent/statistics.json: No such file or directory"
            ),
        ])
    func refusedBeforeBanner(_ before: [String], _ after: [String], _ status: Int32, _ message: String) async throws {
        let fake = try FakeIncusTests.Fake("", before, after: after)
        defer { fake.cleanUp() }
        #expect(try await fake.server.wait() == .exited(status), "\(fake.server.standardError)")
        #expect(try await fake.server.readLine() == nil, "nothing may reach stdout")
        let standardError = await fake.server.standardError(containing: message)
        #expect(standardError.contains(message), "\(standardError)")
        #expect(!standardError.contains("Unknown option"))
        #expect(fake.calls.isEmpty, "nothing ran: \(fake.calls)")
    }

    @Test("serve is the default command: --help is its page; `help` lists setup, import and gc, each with its page")
    func subcommands() async throws {
        let tool = TestPaths.executable("debusine-virt-incus")
        let help = try await runner.run(Command(tool, ["--help"]))
        #expect(help.status == .exited(0) && help.outputText.contains("--remote"), "\(help.outputText)")
        #expect(try await runner.run(Command(tool, ["serve", "--help"])).outputText == help.outputText)
        let commands = try await runner.run(Command(tool, ["help"])).outputText
        for name in ["serve (default)", "setup", "import", "gc"] { #expect(commands.contains(name), "\(commands)") }
        for (name, option) in [("setup", "--ipv4-address"), ("import", "--artifact-id"), ("gc", "--remote")] {
            let page = try await runner.run(Command(tool, [name, "--help"])).outputText
            #expect(page.contains("USAGE: debusine-virt-incus \(name)") && page.contains(option), "\(page)")
        }
    }

    @Test("every option of the installed autopkgtest-virt-incus is one of ours")
    func referenceOptions() async throws {
        let reference = "/usr/bin/autopkgtest-virt-lxd"
        try #require(
            FileManager.default.fileExists(atPath: reference) || TestPaths.isCI == false,
            "autopkgtest is not installed")
        guard let source = try? String(contentsOfFile: reference, encoding: .utf8) else { return }
        let names = ReferenceOptions.names(inArgparseSource: source)
        #expect(names == ["--lxd", "--incus", "-d", "--debug", "-r", "--remote", "--vm"], "\(names)")
        let help = try await runner.run(Command(TestPaths.executable("debusine-virt-incus"), ["--help"]))
        let ours = ReferenceOptions.names(inHelp: help.outputText + help.errorText)
        #expect(names.subtracting(ours).isEmpty, "missing: \(names.subtracting(ours).sorted())")
    }
}
