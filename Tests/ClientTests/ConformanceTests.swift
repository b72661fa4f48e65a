import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// The conformance matrix: autopkgtest called in every way people and debusine call it, against
/// our installed servers and against autopkgtest's own on the same image, with the summaries
/// compared line for line (differential testing).
///
/// The fixture is examples/forms (quick tests: no reboot, no broken testbed). Each form is one
/// autopkgtest run on its own, from the working directory the form needs, so relative paths
/// reach the servers exactly as users' do, and forms on one server may run at once (two lanes
/// per column). autopkgtest-virt-incus runs every form; the QEMU reference boots under TCG for
/// about a minute each time, so it runs one form, debusine's command line, alone after the
/// others: it gives its guest 10 s to mount its shared directory, which a loaded machine misses.
/// (The forms differ in what autopkgtest does on the host, which the Incus reference runs in
/// every form; what the QEMU reference adds, a VM testbed's answers, one form gives.) Each of our
/// columns is compared with every reference run of a form.
///
/// What a reference gives is decided by what ``referenceInputs(_:_:)`` lists (versions of
/// autopkgtest, incus, QEMU, OVMF and the running incusd, the host kernel, the test image and the
/// Incus profile, the package, the forms and this file): the reference columns' results are kept
/// with it (``ReferenceRecord``), beside the test images, and a later run for which all of it is
/// the same compares ours with the kept results instead of running the references again (they
/// took about half of the matrix's CPU time and its 112 s tail). Anything different runs them
/// again; `DEBUSINE_VIRT_CONFORMANCE_LIVE=1` always does.
@Suite("Conformance matrix: autopkgtest command-line forms, ours against autopkgtest's servers")
struct ConformanceTests {
    /// A server column of the matrix.
    enum Server: String, CaseIterable, Sendable, CustomStringConvertible {
        case oursQemu = "debusine-virt-qemu"
        case oursIncus = "debusine-virt-incus"
        case theirsQemu = "autopkgtest-virt-qemu"
        case theirsIncus = "autopkgtest-virt-incus"

        var description: String { rawValue }

        /// The server's argv after autopkgtest's `--`. `debusine` gives debusine's executors'
        /// exact argument lists (qemu: `--boot efi --dpkg-architecture amd64 IMAGE`; incus-lxc:
        /// `artifact/ID -- --profile debusine`).
        func argv(_ setup: Setup, debusine: Bool) -> [String] {
            let image = "\(setup.images)/bookworm-amd64.qcow2"
            switch self {
            case .oursQemu:
                // debusine's list gives the guest the default user network; the run is in a
                // network namespace of its own (`unshare --net`), so nothing leaves the host.
                return debusine
                    ? ["debusine-virt-qemu", "--boot", "efi", "--dpkg-architecture", "amd64", image]
                    : ["debusine-virt-qemu", "--network", "none", "--boot-timeout", "900", image]
            case .oursIncus:
                return ["debusine-virt-incus", setup.incusImage] + (debusine ? ["--", "--profile", "debusine"] : [])
            case .theirsQemu:
                // Its QEMU through scripts/qemu-no-kvm (this machine's /dev/kvm cannot run guests),
                // with time for a TCG boot on a loaded machine.
                let here = [
                    "--qemu-command", "\(TestPaths.repositoryRoot)/scripts/qemu-no-kvm", "--timeout-reboot", "900",
                ]
                return ["autopkgtest-virt-qemu"]
                    + (debusine
                        ? ["--boot", "efi", "--dpkg-architecture", "amd64"]
                        : ["--efi", "--ram-size", "2048", "--cpus", "2"])
                    + here + [image]
            case .theirsIncus:
                // Its launch arguments are debusine's: the image's root disk is in that profile.
                return ["autopkgtest-virt-incus", setup.incusImage, "--", "--profile", "debusine"]
            }
        }
    }

    /// The package built once per test process: a tree, a .dsc and a .deb in one directory.
    struct Setup: Sendable {
        let work: String
        let images: String
        let incusImage: String
        var tree: String { "\(work)/forms" }
        var dsc: String { "\(work)/debusine-virt-forms_1.0.dsc" }
        var deb: String { "\(work)/debusine-virt-forms_1.0_all.deb" }
    }

    /// One way to call autopkgtest.
    struct Form: Sendable, CustomStringConvertible {
        let name: String
        /// The working directory, relative to the setup's work directory ("" for itself).
        var directory = ""
        /// autopkgtest's arguments before `--`, with OUT for a fresh output path of the run.
        let arguments: [String]
        /// The summary every server must give, as `name RESULT` pairs.
        let expected: [String]
        /// What the run's log or output must show, beyond the summary.
        var logContains: [String] = []
        /// Paths that must exist afterwards, relative to the run's working directory.
        var files: [String] = []
        var debusineArguments = false
        /// Whether autopkgtest's QEMU server runs this form too.
        var referenceQemu = false

        var description: String { name }
    }

    static let all = ["smoke PASS", "artifacts PASS", "slow PASS", "fails FAIL"]
    static let skipInstalled = ["--skip-test", "installed"]
    static let artifact = "odd dir ü/file, with % and spaces"

    static let forms: [Form] = [
        Form(
            name: "cd pkg && autopkgtest . -- SERVER", directory: "forms",
            arguments: ["-B"] + skipInstalled + ["."], expected: all),
        // A relative output directory and a relative tree in one run: both are host paths the
        // server gets relative to autopkgtest's working directory.
        Form(
            name: "autopkgtest -o out pkg/ -- SERVER (relative paths), artifacts with odd names",
            arguments: ["-B"] + skipInstalled + ["-o", "OUT", "forms/"], expected: all,
            files: ["OUT/artifacts/\(artifact)", "OUT/log", "OUT/smoke-stdout", "OUT/fails-stderr"]),
        Form(
            name: "autopkgtest /abs/pkg/ -- SERVER", arguments: ["-B"] + skipInstalled + ["ABS/forms/"], expected: all),
        Form(
            name: "autopkgtest pkg.dsc -- SERVER (relative .dsc)",
            arguments: ["-B"] + skipInstalled + ["debusine-virt-forms_1.0.dsc"], expected: all),
        Form(
            name: "autopkgtest /abs/pkg.dsc -- SERVER",
            arguments: ["-B"] + skipInstalled + ["ABS/debusine-virt-forms_1.0.dsc"], expected: all),
        Form(
            name: "autopkgtest pkg.deb pkg/ -- SERVER (a binary and its source tree)",
            arguments: ["-B", "debusine-virt-forms_1.0_all.deb", "forms/"],
            expected: ["smoke PASS", "artifacts PASS", "slow PASS", "installed PASS", "fails FAIL"],
            logContains: ["forms: installed debusine-virt-forms 1.0"]),
        // The options that change what runs in the testbed, in one run: the smoke test prints
        // what each did. --shell-fail with no terminal (no controlling terminal, stdin /dev/null,
        // as in CI and on debusine's workers) must give up after the failing test, not hang.
        Form(
            name: "--setup-commands, --env, --user nobody, --shell-fail without a terminal",
            arguments: ["-B"] + skipInstalled + [
                "--setup-commands", "echo configured > /var/tmp/forms-setup", "--env", "FORMS_VAR=set by --env",
                "--user", "nobody", "--shell-fail", "forms/",
            ],
            expected: all,
            logContains: ["setup=configured", "var=set by --env", "user=nobody", "- - - running shell - - -"]),
        Form(
            name: "--test-name", arguments: ["-B", "--test-name", "smoke", "forms/"], expected: ["smoke PASS"]),
        Form(
            name: "--timeout-test that fires: the test is killed, the next one runs",
            arguments: ["-B"] + skipInstalled + ["--timeout-test", "15", "--env", "FORMS_SLEEP=600", "forms/"],
            expected: ["smoke PASS", "artifacts PASS", "slow FAIL", "fails FAIL"], logContains: ["timed out"]),
        Form(
            name: "debusine's exact server arguments", arguments: ["-B"] + skipInstalled + ["forms/"], expected: all,
            debusineArguments: true, referenceQemu: true),
    ]

    /// What one run gave.
    struct Outcome: Sendable {
        let status: ProcessStatus
        let summary: [String]
        let log: String
    }

    static let runner = SubprocessRunner()

    /// The tree, .dsc and .deb of examples/forms, made once for the matrix.
    static func makeSetup() async throws -> Setup {
        let images = try #require(
            Installed.qemuImages, "DEBUSINE_VIRT_TEST_IMAGES is not set: run through scripts/test")
        let incusImage = try #require(
            Installed.incusImage, "DEBUSINE_VIRT_INCUS_IMAGE is not set: run through scripts/test")
        let work = try TestPaths.makeTemporaryDirectory("dv-forms.")
        try await runner.check(Command("cp", ["-r", "\(TestPaths.repositoryRoot)/examples/forms", "\(work)/forms"]))
        try await runner.check(Command("dpkg-source", ["--build", "forms"], workingDirectory: work))
        // The .deb from a copy of the tree, so the tree the forms use stays as it is.
        try await runner.check(Command("cp", ["-r", "\(work)/forms", "\(work)/build/"]))
        try await runner.check(Command("debian/rules", ["binary"], workingDirectory: "\(work)/build"))
        return Setup(work: work, images: images, incusImage: incusImage)
    }

    /// Runs `form` against `server` in a directory of its own holding links to the package.
    static func run(_ form: Form, on server: Server, _ setup: Setup) async throws -> Outcome {
        let run = try TestPaths.makeTemporaryDirectory("dv-form.")
        defer { TestPaths.removeTree(run) }
        for name in [
            "forms", "debusine-virt-forms_1.0.dsc", "debusine-virt-forms_1.0.tar.xz", "debusine-virt-forms_1.0_all.deb",
        ] {
            try await runner.check(Command("cp", ["-r", "\(setup.work)/\(name)", run]))
        }
        let directory = form.directory.isEmpty ? run : "\(run)/\(form.directory)"
        let arguments = form.arguments.map {
            $0.replacingOccurrences(of: "ABS", with: run).replacingOccurrences(of: "OUT", with: "out")
        }
        var command =
            ["autopkgtest", "--summary-file=\(run)/summary"] + arguments + ["--"]
            + server.argv(setup, debusine: form.debusineArguments)
        if server == .oursQemu && form.debusineArguments { command = ["unshare", "--net", "--"] + command }
        // No controlling terminal and stdin from /dev/null, as in CI and debusine's workers;
        // --shell-fail there must give up, not wait for a terminal.
        command = ["setsid", "--wait"] + command
        let result = try await runner.run(
            Command(
                command[0], Array(command.dropFirst()),
                environment: ["PATH": try Installed.path(), "TMPDIR": run], workingDirectory: directory),
            input: .none, output: .capture(limit: 16 << 20), error: .capture(limit: 64 << 20))
        let summary = ((try? String(contentsOfFile: "\(run)/summary", encoding: .utf8)) ?? "")
            .split(separator: "\n").map { $0.split(separator: " ").joined(separator: " ") }
        var log = result.errorText + result.outputText
        for file in form.files {
            let path = "\(directory)/\(file.replacingOccurrences(of: "OUT", with: "out"))"
            if access(path, F_OK) != 0 { log += "\nMISSING FILE \(file)" }
        }
        return Outcome(status: result.status, summary: summary, log: log)
    }

    /// What is wrong with one outcome, whichever server gave it: the checks every run must pass.
    static func problems(_ outcome: Outcome, _ form: Form, _ server: Server) -> [String] {
        let pairs = outcome.summary.map { $0.split(separator: " ").prefix(2).joined(separator: " ") }
        let context = "\(form.name) on \(server): \(outcome.status)\n\(outcome.summary)\n\(outcome.log.suffix(4000))"
        var problems: [String] = []
        if pairs != form.expected { problems.append("not the expected summary \(form.expected): \(context)") }
        let failed = form.expected.contains { !$0.hasSuffix(" PASS") }
        if outcome.status != .exited(failed ? 4 : 0) {
            problems.append("not exit status \(failed ? 4 : 0): \(context)")
        }
        for needle in form.logContains where !outcome.log.contains(needle) {
            problems.append("`\(needle)` missing: \(context)")
        }
        if outcome.log.contains("MISSING FILE") { problems.append("a file is missing: \(context)") }
        return problems
    }

    /// Records each of ``problems(_:_:_:)`` as an issue of the test.
    static func check(_ outcome: Outcome, _ form: Form, _ server: Server) {
        for problem in problems(outcome, form, server) { Issue.record(Comment(rawValue: problem)) }
    }

    /// The forms `server` runs.
    static func forms(of server: Server) -> [Form] {
        forms.filter { server != .theirsQemu || $0.referenceQemu }
    }

    /// A reference column's results, kept with everything that decided them.
    struct ReferenceRecord: Codable, Sendable {
        /// What a run must have the same to use these results: versions, image, package, forms.
        let inputs: String
        /// When the reference ran (ISO 8601).
        let recorded: String
        /// Each form's result by the form's name.
        let outcomes: [String: Kept]

        /// One form's result: its summary and autopkgtest's exit status.
        struct Kept: Codable, Sendable {
            let summary: [String]
            let exited: Int32?
            let signaled: Int32?
        }
    }

    /// Everything that decides what autopkgtest's own server gives in this matrix, as text: the
    /// packages' versions, the running incusd's and the host kernel's, the image and the Incus
    /// profile the reference launches with (both made by our `import` and `setup`), the QEMU
    /// wrapper, the package, the forms, and this file (how autopkgtest is run and read).
    static func referenceInputs(_ server: Server, _ setup: Setup) async throws -> String {
        func output(_ argv: String...) async throws -> String {
            let result = try await runner.run(
                Command(argv: argv), input: .none, output: .capture, error: .capture)
            return "\(argv.joined(separator: " ")): \(result.status)\n\(result.outputText)\n\(result.errorText)"
        }
        var lines = [
            try await output(
                "dpkg-query", "-W", "-f", "${Package} ${Version}\n", "autopkgtest", "incus", "qemu-system-x86", "ovmf"),
            try await output("uname", "-r"),
        ]
        if server == .theirsIncus {
            lines.append(try await output("incus", "version"))
            lines.append(try await output("incus", "profile", "show", "debusine"))
            let image = try await output("incus", "image", "info", setup.incusImage)
            lines.append(
                "incus image \(setup.incusImage): "
                    + (image.split(separator: "\n").first { $0.hasPrefix("Fingerprint:") } ?? "no fingerprint"))
        }
        lines.append("images \(setup.images)")
        // Any clone of the repository: files by their content, not their path.
        let root = TestPaths.repositoryRoot
        let argv = "\(server.argv(setup, debusine: false)) \(server.argv(setup, debusine: true))"
        lines.append("server \(argv.replacingOccurrences(of: root, with: "REPOSITORY"))")
        for file in ["scripts/qemu-no-kvm", "Tests/ClientTests/ConformanceTests.swift"] {
            let bytes = try #require(FileManager.default.contents(atPath: "\(root)/\(file)"), "cannot read \(file)")
            lines.append("\(file) \(SHA256.hexDigest(of: bytes))")
        }
        lines.append("package \(try treeDigest("\(root)/examples/forms"))")
        for form in forms(of: server) {
            lines.append(
                "form \(form.name) | \(form.directory) | \(form.arguments) | \(form.expected) | \(form.logContains) | "
                    + "\(form.files) | \(form.debusineArguments)")
        }
        return lines.joined(separator: "\n")
    }

    /// The SHA-256 of a tree as git sees it: paths, kinds, executable bits, file contents and
    /// link targets (not the umask's permission bits, which differ between clones).
    static func treeDigest(_ root: String) throws -> String {
        var hash = SHA256()
        let enumerator = try #require(FileManager.default.enumerator(atPath: root), "cannot list \(root)")
        let paths = (enumerator.allObjects as? [String] ?? []).sorted()
        try #require(!paths.isEmpty, "\(root) is empty")
        for path in paths {
            let full = "\(root)/\(path)"
            var info = stat()
            try #require(lstat(full, &info) == 0, "cannot stat \(full)")
            switch info.st_mode & S_IFMT {
            case S_IFREG:
                hash.update(Array("file \(path) \(info.st_mode & 0o111 != 0)\0".utf8))
                hash.update(try Data(contentsOf: URL(fileURLWithPath: full)))
            case S_IFLNK:
                let target = try FileManager.default.destinationOfSymbolicLink(atPath: full)
                hash.update(Array("link \(path) \(target)\0".utf8))
            default:
                hash.update(Array("other \(path) \(info.st_mode & S_IFMT)\0".utf8))
            }
        }
        return hash.hexDigest()
    }

    /// A reference column: its kept results when everything that decides them is the same as
    /// when they were kept, else a run of it, whose results are kept when every form passed.
    static func referenceColumn(_ server: Server, lanes: Int, _ setup: Setup) async throws -> [String: Outcome] {
        let inputs = try await referenceInputs(server, setup)
        let directory = "\(setup.images)/conformance-reference"
        let path = "\(directory)/\(server.rawValue).json"
        let live = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_CONFORMANCE_LIVE"] == "1"
        let record = FileManager.default.contents(atPath: path).flatMap {
            try? JSONDecoder().decode(ReferenceRecord.self, from: $0)
        }
        let kept = record.map { record in
            record.outcomes.compactMapValues { kept -> Outcome? in
                let status: ProcessStatus? =
                    if let code = kept.exited { .exited(code) } else if let signal = kept.signaled {
                        .signaled(signal)
                    } else { nil }
                return status.map { Outcome(status: $0, summary: kept.summary, log: "") }
            }
        }
        let complete = kept.map { kept in forms(of: server).allSatisfy { kept[$0.name] != nil } } ?? false
        if let record, !live {
            if record.inputs != inputs {
                // What differs, so that a run that took longer says why.
                let now = inputs.split(separator: "\n", omittingEmptySubsequences: false)
                let then = record.inputs.split(separator: "\n", omittingEmptySubsequences: false)
                let first =
                    zip(now, then).first { $0 != $1 }.map { "\($0.1) became \($0.0)" } ?? "lines added or removed"
                print("conformance: \(server): its kept results (\(path)) are for other inputs (\(first)): running it")
            } else if !complete {
                print("conformance: \(server): its kept results (\(path)) lack a form: running it")
            }
        }
        if !live, let record, let kept, record.inputs == inputs, complete {
            print(
                "conformance: \(server): not run again: its results of \(record.recorded) (\(path)) are for the same "
                    + "autopkgtest, incus, QEMU, OVMF, image, package and forms; DEBUSINE_VIRT_CONFORMANCE_LIVE=1 runs it"
            )
            return kept
        }
        let outcomes = try await column(server, lanes: lanes, setup)
        let passed = forms(of: server).allSatisfy { form in
            outcomes[form.name].map { problems($0, form, server).isEmpty } ?? false
        }
        if passed {
            let record = ReferenceRecord(
                inputs: inputs, recorded: ISO8601DateFormatter().string(from: Date()),
                outcomes: outcomes.mapValues { outcome in
                    switch outcome.status {
                    case .exited(let code): .init(summary: outcome.summary, exited: code, signaled: nil)
                    case .signaled(let signal): .init(summary: outcome.summary, exited: nil, signaled: signal)
                    }
                })
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                try encoder.encode(record).write(to: URL(fileURLWithPath: path), options: .atomic)
                print("conformance: \(server): its results are kept in \(path)")
            } catch {
                // A read-only image directory costs the next run the reference's time, no more.
                print("conformance: \(server): cannot keep its results in \(path): \(error)")
            }
        }
        return outcomes
    }

    /// The forms a column has yet to run, taken by its lanes one at a time.
    actor Queue {
        var forms: [Form]
        init(_ forms: [Form]) { self.forms = forms }
        func next() -> Form? { forms.isEmpty ? nil : forms.removeFirst() }
    }

    /// Every form on one server, in `lanes` runs at once (each form has a directory of its own):
    /// each lane takes the next form when its last one ends.
    static func column(_ server: Server, lanes: Int, _ setup: Setup) async throws -> [String: Outcome] {
        let queue = Queue(forms(of: server))
        return try await withThrowingTaskGroup(of: [String: Outcome].self) { group in
            for _ in 0..<lanes {
                group.addTask { try await Self.lane(queue, on: server, setup) }
            }
            var outcomes: [String: Outcome] = [:]
            for try await part in group { outcomes.merge(part) { first, _ in first } }
            return outcomes
        }
    }

    /// Forms from `queue` on one server, one after another.
    static func lane(_ queue: Queue, on server: Server, _ setup: Setup) async throws -> [String: Outcome] {
        var outcomes: [String: Outcome] = [:]
        while let form = await queue.next() {
            let started = ContinuousClock.now
            var outcome = try await run(form, on: server, setup)
            if server == .theirsIncus && outcome.status == .exited(16) {
                // incus exec loses the output of a command that ends right after writing it, now
                // and then, when several run at once on a busy host (incus 6.0.4; 2-4 % of short
                // commands here): a copy then fails, and autopkgtest calls it a testbed failure.
                // It hit autopkgtest-virt-incus here in CI. Ours frames its commands' output and
                // ends them only once the output is in (FramedExec), so it gets no second run.
                print(
                    "conformance: \(server): testbed failure, running the form once more (incus exec output loss): "
                        + "\(form.name)\n\(outcome.summary)\n\(outcome.log.suffix(3000))")
                outcome = try await run(form, on: server, setup)
            }
            // Where the matrix's time goes, per server and form.
            print("conformance: \(server): \((ContinuousClock.now - started).components.seconds) s: \(form.name)")
            check(outcome, form, server)
            outcomes[form.name] = outcome
        }
        return outcomes
    }

    @Test(
        "every form gives the same summary, line for line, from our servers and autopkgtest's",
        .enabled(if: Installed.canRunQemu && Installed.canRunIncus), .timeLimit(.minutes(60)))
    func matrix() async throws {
        let setup = try await Self.makeSetup()
        defer { TestPaths.removeTree(setup.work) }
        // Our columns and the Incus reference side by side, each in two lanes (two of our QEMU
        // guests at a time), then the QEMU reference alone (each reference only when its kept
        // results are not for this run's inputs).
        var results = try await withThrowingTaskGroup(of: (Server, [String: Outcome]).self) { group in
            for server in [Server.oursQemu, .oursIncus] {
                group.addTask { (server, try await Self.column(server, lanes: 2, setup)) }
            }
            group.addTask { (.theirsIncus, try await Self.referenceColumn(.theirsIncus, lanes: 2, setup)) }
            var results: [Server: [String: Outcome]] = [:]
            for try await (server, outcomes) in group { results[server] = outcomes }
            return results
        }
        results[.theirsQemu] = try await Self.referenceColumn(.theirsQemu, lanes: 1, setup)
        // examples/forms needs nothing of one kind of testbed (no isolation, no reboot), so every
        // reference's run of a form is what each of ours must give: ours are compared with both.
        for server in [Server.oursQemu, .oursIncus] {
            for form in Self.forms {
                guard let ours = results[server]?[form.name] else {
                    Issue.record("\(form.name): no result from \(server)")
                    continue
                }
                for reference in [Server.theirsQemu, .theirsIncus] {
                    guard let theirs = results[reference]?[form.name] else {
                        if Self.forms(of: reference).contains(where: { $0.name == form.name }) {
                            Issue.record("\(form.name): no result from \(reference)")
                        }
                        continue
                    }
                    #expect(
                        ours.summary == theirs.summary,
                        "\(form.name): \(server) and \(reference) differ:\n\(ours.summary)\n\(theirs.summary)")
                    #expect(
                        ours.status == theirs.status,
                        "\(form.name): \(server) \(ours.status) against \(reference) \(theirs.status)")
                }
            }
        }
    }
}
