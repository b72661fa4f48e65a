import CommandRunner
import Foundation
import Synchronization
import TestbedCore
import VirtCore

/// What `debusine-virt-incus` was asked to run.
public struct IncusOptions: Sendable {
    /// The image alias, e.g. `artifact/42` (without the remote).
    public var image: String
    public var virtualMachine = false
    public var profiles = ["debusine"]
    public var target: String?
    public var extraLaunchArguments: [String] = []
    public var bootTimeout: Duration = .seconds(300)
    /// How long a graceful stop may take before the instance is killed.
    public var stopTimeout = 30
    /// Keep a spare instance made (`incus init`, not started) ahead, so that a revert only starts
    /// it (`--no-spare` turns it off); see ``eagerSpare`` for when it is made.
    public var spare = true
    /// Make the spare as soon as the testbed is up, even while the test keeps the host busy. By
    /// default it waits for a quiet moment on this host (``QuietHost``), unless the instances are
    /// on a remote, whose load this host cannot see.
    public var eagerSpare = false
    /// What "quiet" means for the spare's wait.
    var quietHost = QuietHost()
    public var cli = IncusCLI()
    /// debusine-virt-auxverb: the auxverb runs the wrapper through it in framed mode
    /// (``AuxverbWrapper``); plain `incus exec` now and then loses a command's output on a busy
    /// host.
    public var auxverbExecutable: String
    /// Run commands through the guest helper over one `incus exec` opened with each instance
    /// (``HelperChannel``) where the image has python3; false (`--no-guest-helper`): through an
    /// `incus exec` each.
    public var guestHelper = true

    public init(image: String, auxverbExecutable: String) {
        self.image = image
        self.auxverbExecutable = auxverbExecutable
    }
}

/// The Incus backend: an ephemeral container (or VM) launched from an imported image, driven
/// through the `incus` CLI. Revert starts a fresh instance; the instance's own ephemeral
/// flag plus the owner labels make sure nothing outlives the server for long.
///
/// Revert is a new instance from the image, made ahead: once a testbed is up and the host is
/// quiet (``QuietHost``), a spare is made (`incus init`), and a revert only starts it, as any
/// pool driver allows (`--no-spare`: a revert launches; a revert that comes before the host was
/// quiet makes the spare then). Medians on the `dir` pool here (README): starting a spare
/// 1.0 s, a launch 9.8 s (making an instance unpacks the image), `incus copy` of a template
/// 14.8 s. `incus snapshot restore` (2.7 s) is not a revert on `dir`: its rsync keeps a file
/// rewritten with the same size and modification time. Stateful snapshots need CRIU.
public final class IncusTestbed: Testbed {
    let options: IncusOptions
    let runner: any CommandRunner
    let owner: InstanceOwner
    /// The running instance, the spare, and the `incus launch`, `init`, `start` and `delete`
    /// commands in flight that a close must outwait.
    private let instances = OwnedInstances()
    private let state = Mutex<State>(State())

    struct State {
        var normalUser: String?
        /// The guest helper's relay and its helper in the running instance, made by the first
        /// bring-up; nil with `--no-guest-helper`, or before.
        var helper: HelperChannel?
        /// A close has begun: no helper channel is made from now on.
        var closing = false
        /// The sweep for instances of dead servers, started by the first open.
        var sweep: Task<Void, Never>?
    }

    public init(options: IncusOptions, runner: any CommandRunner = SubprocessRunner()) {
        self.options = options
        self.runner = runner
        self.owner = InstanceOwner.current()
    }

    var cli: IncusCLI { options.cli }

    /// The running instance's name.
    public var instanceName: String? { instances.current }

    public func capabilities() async -> [String] {
        var words = [Capability.revert, Capability.revertFullSystem, Capability.reboot, Capability.rootOnTestbed]
        words.append(options.virtualMachine ? Capability.isolationMachine : Capability.isolationContainer)
        if let user = state.withLock({ $0.normalUser }) { words.append(Capability.suggestedNormalUser(user)) }
        return words
    }

    public func open() async throws(VirtError) -> [String] {
        sweepOnce()
        let auxverb = try await launch()
        prepareSpare()
        return auxverb
    }

    public func revert() async throws(VirtError) -> [String] {
        // Its commands end with the instance; it is not started again in an instance going away.
        await state.withLock { $0.helper }?.stop()
        let (old, spareTask) = instances.retireCurrent()
        // The old instance's state is thrown away: it is force-deleted while the new one is
        // started, rather than shut down cleanly first.
        async let deletion: Void = deleteRetired(old)
        let launched: Result<[String], VirtError>
        do {
            if let spare = await instances.promote(spareTask) {
                launched = .success(try await startSpare(spare))
            } else {
                launched = .success(try await launch())
            }
        } catch {
            launched = .failure(error)
        }
        await deletion
        let auxverb = try launched.get()
        prepareSpare()
        return auxverb
    }

    /// Deletes, in the background, the instances of servers of this machine that died without
    /// their death watch cleaning up (the whole session killed, the machine restarted): what
    /// `gc` does, limited as it is to owners that are provably gone.
    private func sweepOnce() {
        state.withLock { state in
            guard state.sweep == nil, !instances.isClosed else { return }
            let collector = IncusGarbageCollector(cli: cli, runner: runner)
            state.sweep = Task {
                do throws(VirtError) {
                    for line in try await collector.collect(provenMachine: true) {
                        log.info("start-up sweep: \(line)")
                    }
                } catch {
                    log.debug("start-up sweep: \(error.message)")
                }
            }
        }
    }

    /// Makes the spare for the next revert in the background, unless there is one.
    private func prepareSpare() {
        guard options.spare else { return }
        let quietHost = options.quietHost
        let wait: (@Sendable () async -> Void)? =
            options.eagerSpare || cli.remote != nil
            ? nil
            : { @Sendable in
                let quiet = await quietHost.wait()
                log.debug(
                    quiet
                        ? "the host is quiet: making the spare"
                        : "the wait for a quiet host ended early (a revert or a close)")
            }
        let current = instances.current
        instances.prepareSpare(after: wait) {
            do throws(VirtError) {
                // On a cluster, the member the instance it replaces was placed on: a revert
                // then stays on the member that had room (and has the image unpacked).
                var target = self.options.target
                if target == nil, let current { target = await self.location(of: current) }
                let spare = try await self.createInstance(.spare, target: target)
                log.debug("made the spare \(self.cli.qualified(spare))")
                return spare
            } catch {
                if !self.instances.isClosed {
                    log.info("could not make a spare instance for the next revert: \(error.message)")
                }
                return nil
            }
        }
    }

    /// Starts the spare and waits for it as for a launch; a spare that does not start is
    /// deleted and a new instance launched instead.
    private func startSpare(_ name: String) async throws(VirtError) -> [String] {
        log.info("starting the spare \(cli.qualified(name)), made for this revert")
        let start = cli.start(name)
        let result: CommandResult
        do {
            result = try await instances.counted { () async throws(VirtError) in try await control(start) }
        } catch {
            await forget(name)
            throw error
        }
        guard result.status.succeeded else {
            log.warning(
                "the spare \(cli.qualified(name)) did not start (\(result.errorText)); launching a new instance")
            await forget(name)
            return try await launch()
        }
        return try await bringUp(name)
    }

    /// Deletes the instance a revert replaced, which ``OwnedInstances/retireCurrent()`` counted.
    private func deleteRetired(_ name: String?) async {
        guard let name else { return }
        defer { instances.leave() }
        await delete(name)
    }

    public func close() async {
        // Nothing new starts now. What runs (a launch for open or revert, the making of a spare,
        // the deletion of the instance a revert replaced) is waited for, not cancelled: an
        // interrupted `incus init` may still leave the instance made.
        // No helper is made or started again from now on, in an instance being stopped or in
        // one a bring-up still in flight makes.
        let helper = state.withLock { state -> HelperChannel? in
            state.closing = true
            return state.helper
        }
        await helper?.shutdown()
        let (name, spare) = await instances.close(within: options.bootTimeout)
        // Never started: nothing to shut down cleanly.
        async let spareDeletion: Void = { if let spare { await delete(spare) } }()
        if let name { await stopAndDelete(name) }
        await spareDeletion
        await helper?.close()
        // Others' leftovers are no reason to keep the caller waiting: an unfinished sweep ends
        // with an interrupted delete, which incusd completes, or the next sweep does.
        if let sweep = state.withLock({ $0.sweep }) {
            sweep.cancel()
            await sweep.value
        }
    }

    public var rebootTimeout: Duration { .seconds(300) }

    /// Copies go through an `incus exec` of their own (the framed wrapper), not the guest
    /// helper: for bulk data that is the faster path here (256 MiB out of an instance: 0.55-0.65 s
    /// against 0.78-1.01 s, in: 1.14-1.41 s against 1.91-2.16 s; docs/performance.md), and a copy
    /// pays the exec's start-up once.
    public func copy(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        try await CopyPlumbing.copy(request, InTestbed(auxverb: auxverb(try runningName()), runner: runner))
    }

    /// The kernel's boot id is the host's in a container, so the boot is told apart by the start
    /// time of the instance's init as well.
    /// Read through the auxverb (framed: its output cannot go missing). An empty id would pass
    /// for a new boot, so it is an error.
    public func bootID(_ testbed: InTestbed) async throws(VirtError) -> String {
        _ = try runningName()
        let id = try await testbed.script(Self.bootIDScript)
        guard id.contains("/"), !id.hasPrefix("/"), !id.hasSuffix("/") else {
            throw VirtError(.testbedFailure, "the testbed gave no boot id: `\(id)'")
        }
        return id
    }

    static let bootIDScript =
        #"read -r id < /proc/sys/kernel/random/boot_id; read -r stat < /proc/1/stat; set -- ${stat##*) }; shift 19; echo "$id/$1""#

    public func waitForReboot(
        _ testbed: InTestbed, previousBootID: String, requested: Bool
    ) async throws(VirtError) -> [String] {
        try await RebootSequence.pollForNewBootID(self, testbed, previousBootID: previousBootID)
        let name = try runningName()
        try await waitBooted(name, timeout: options.bootTimeout)
        return testbed.auxverb
    }

    public func shell(_ testbed: InTestbed, directory: String, environment: [String]) async throws(VirtError) {
        let name = try runningName()
        let tty = Glibc.open("/dev/tty", O_RDWR | O_CLOEXEC)
        guard tty >= 0 else {
            log.error("cannot run a shell: /dev/tty: \(VirtError.text(errno: errno))")
            return
        }
        defer { Glibc.close(tty) }
        var assignments = environment
        if let term = getenv("TERM") { assignments.append("TERM=\(String(cString: term))") }
        let result = try await runner.run(
            cli.interactive(name, directory: directory, environment: assignments, ["bash", "-l"]),
            input: .fileDescriptor(tty, closeAfterStart: false),
            output: .fileDescriptor(tty, closeAfterStart: false),
            error: .fileDescriptor(tty, closeAfterStart: false))
        log.debug("shell ended with \(result.status)")
    }

    public func debugFailureReport() async -> String? {
        guard let name = instances.current else { return nil }
        return await showLog(name)
    }

    /// The instance's console log, for an error message: asked for 30 s at most.
    private func showLog(_ name: String) async -> String? {
        let command = cli.showLog(name)
        guard let result = try? await control(command, within: .seconds(30)), result.status.succeeded else {
            return nil
        }
        return result.outputText
    }

    func runningName() throws(VirtError) -> String {
        guard let name = instances.current else {
            throw VirtError(.testbedFailure, "the testbed is not running")
        }
        return name
    }

    /// The auxverb without a guest helper: an `incus exec` of the wrapper per command.
    func auxverb(_ name: String) -> [String] {
        let runner = cli.execPrefix(name) + [AuxverbWrapper.path, "--framed"]
        return [options.auxverbExecutable, "--exec", String(runner.count)] + runner
    }

    /// The auxverb through the guest helper: the wrapper still sets the environment up.
    func auxverb(_ helper: HelperChannel) -> [String] {
        [options.auxverbExecutable, helper.relay.socketPath, AuxverbWrapper.path, "--login"]
    }

    /// The helper channel, made on first use; nil with `--no-guest-helper` or once closed.
    private func helperChannel() -> HelperChannel? {
        guard options.guestHelper else { return nil }
        return state.withLock { state -> HelperChannel? in
            if let helper = state.helper { return helper }
            guard !state.closing else { return nil }
            do throws(VirtError) {
                state.helper = try HelperChannel(cli: cli, runner: runner)
            } catch {
                log.info("no guest helper: \(error.message)")
                return nil
            }
            return state.helper
        }
    }

    // MARK: - Lifecycle

    private func launch() async throws(VirtError) -> [String] {
        try await bringUp(try await createInstance(.current))
    }

    /// Waits for a started instance to boot and installs the auxverb's wrapper in it.
    private func bringUp(_ name: String) async throws(VirtError) -> [String] {
        do throws(VirtError) {
            try await waitBooted(name, timeout: options.bootTimeout)
            // The wrapper sets the environment up on both paths; the helper starts meanwhile.
            let helper = helperChannel()
            async let helperUp: Bool = { if let helper { await helper.start(in: name) } else { false } }()
            var installed: VirtError?
            do throws(VirtError) {
                let install = cli.exec(
                    name, ["/bin/sh", "-c", AuxverbWrapper.installScript, "sh", AuxverbWrapper.path])
                let result = try await control(install, input: .bytes(Array(AuxverbWrapper.script.utf8)))
                guard result.status.succeeded else { throw VirtError.failed(install, result) }
            } catch {
                installed = error
            }
            let auxverb = if await helperUp, let helper { auxverb(helper) } else { auxverb(name) }
            if let installed { throw installed }
            let user = await NormalUser.find(in: InTestbed(auxverb: auxverb, runner: runner))
            state.withLock { $0.normalUser = user }
            return auxverb
        } catch {
            log.debug("\(name) did not come up, deleting it: \(error)")
            await state.withLock { $0.helper }?.stop()
            await forget(name)
            throw error
        }
    }

    /// Makes an instance under a new name: launched for `.current`, only made for `.spare`. A
    /// name that is taken (by anyone) is never touched; an instance that a failed launch left
    /// behind is deleted when it carries our labels.
    private func createInstance(
        _ role: OwnedInstances.Role, target: String? = nil
    ) async throws(VirtError) -> String {
        var lastError = VirtError(.internalError, "no launch attempted")
        for _ in 0..<3 {
            let name = InstanceName.make()
            // Named and counted in the same step as the check, so a close either stops this
            // launch or waits for it and then deletes what it made.
            guard instances.beginMaking(name, as: role) else {
                throw VirtError(.testbedFailure, "the server is shutting down")
            }
            let launch = IncusCLI.Launch(
                image: options.image, name: name, profiles: options.profiles,
                virtualMachine: options.virtualMachine, target: target ?? options.target,
                configuration: owner.labels(), extraArguments: options.extraLaunchArguments)
            let command: Command
            switch role {
            case .current:
                log.info("launching \(cli.qualified(name)) from \(cli.qualified(options.image))")
                command = cli.launch(launch)
            case .spare:
                log.debug("making the spare \(cli.qualified(name)) from \(cli.qualified(options.image))")
                command = cli.initialise(launch)
            }
            let result: CommandResult
            do {
                defer { instances.leave() }
                // Bounded: on a cluster, a member that goes away while it makes the instance
                // leaves the client waiting for the operation for good.
                result = try await control(command)
            } catch {
                // The client is stopped, not incusd's operation: what it makes is deleted when
                // it carries our labels, and the name is not kept as the spare.
                await forget(name)
                throw error
            }
            if result.status.succeeded { return name }
            lastError = IncusErrors.launchFailed(command, result, image: cli.qualified(options.image))
            if result.errorText.contains("already exists") {
                instances.drop(name)
                continue
            }
            await forget(name)
            throw lastError
        }
        throw lastError
    }

    /// Runs an `incus` command that manages or asks about an instance, bounded by --boot-timeout
    /// (or `limit`): an incusd or cluster member that stopped answering leaves its client
    /// waiting for good, and a revert or close must end all the same. Copies, the shell and the
    /// guest helper's stream run unbounded, through `runner`.
    private func control(
        _ command: Command, input: CommandInput = .none, within limit: Duration? = nil
    ) async throws(VirtError) -> CommandResult {
        try await TimeLimitedRunner(runner, limit: limit ?? options.bootTimeout).run(command, input: input)
    }

    /// The cluster member `name` runs on; nil when the server is not clustered or cannot say.
    func location(of name: String) async -> String? {
        guard let result = try? await control(cli.instanceInfo(name)), result.status.succeeded,
            let data = result.outputText.data(using: .utf8),
            let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let location = object["location"] as? String, !location.isEmpty, location != "none"
        else { return nil }
        return location
    }

    /// Deletes `name` if it still exists and is ours, and drops it from the state.
    private func forget(_ name: String) async {
        // Counted before the name goes, as in revert: a close finds the name or waits.
        await instances.counted { () async -> Void in
            instances.drop(name)
            switch await isOurs(name) {
            case true: await delete(name)
            case false: break
            case nil:
                log.error(
                    "could not tell whether \(cli.qualified(name)) is this server's to delete; "
                        + "`debusine-virt-incus gc` removes it later if it is")
            }
        }
    }

    /// Whether `name` carries this server's label; nil when incusd did not say (no answer in
    /// time, or an error other than there being no such instance).
    private func isOurs(_ name: String) async -> Bool? {
        guard let result = try? await control(cli.configGet(name, InstanceOwner.pidKey)) else { return nil }
        if result.status.succeeded { return result.outputText == String(owner.pid) }
        return IncusErrors.isNotFound(result) ? false : nil
    }

    /// Polls `systemctl is-system-running` until the instance has booted.
    func waitBooted(_ name: String, timeout: Duration) async throws(VirtError) {
        var last = ""
        let deadline = Deadline(after: timeout)
        let booted = try await deadline.poll(every: .milliseconds(100)) { () throws(VirtError) -> Bool in
            let result: CommandResult
            do throws(VirtError) {
                result = try await control(
                    cli.exec(name, ["systemctl", "is-system-running"]), within: deadline.remaining())
            } catch  where error.code == .timeout {
                // The last try is cut short by the deadline: what came before says more.
                if last.isEmpty { last = error.message }
                return false
            }
            switch BootState(result) {
            case .booted:
                return true
            case .noSystemd:
                log.debug("\(name) has no systemctl; taking a working exec as booted")
                return true
            case .waiting(let why):
                last = why
                return false
            case .gone(let why):
                throw VirtError(.testbedFailure, "\(cli.qualified(name)) stopped while booting: \(why)")
            }
        }
        if booted { return }
        if Task.isCancelled { throw VirtError(.timeout, "waiting for \(name) to boot was cancelled") }
        let instanceLog = await showLog(name) ?? "(no log)"
        throw VirtError(
            .timeout,
            "\(cli.qualified(name)) did not finish booting within \(timeout) (last state: \(last)); its log:\n\(instanceLog)"
        )
    }

    private func delete(_ name: String) async {
        do {
            let result = try await instances.counted { () async throws(VirtError) in
                try await control(cli.delete(name))
            }
            if !result.status.succeeded && !IncusErrors.isNotFound(result) {
                log.error(
                    "could not delete the instance \(cli.qualified(name)): \(result.errorText); "
                        + "`debusine-virt-incus gc` removes it later")
            }
        } catch {
            log.error(
                "could not delete the instance \(cli.qualified(name)): \(error.message); "
                    + "`debusine-virt-incus gc` removes it later")
        }
    }

    /// A clean shutdown (the instance is ephemeral: stopping deletes it), killed after the stop
    /// timeout, then a delete in case anything is left.
    private func stopAndDelete(_ name: String) async {
        log.debug("stopping \(cli.qualified(name))")
        let stopped = try? await control(
            cli.stop(name, timeout: options.stopTimeout), within: .seconds(options.stopTimeout) + options.bootTimeout)
        if let stopped, stopped.status.succeeded || IncusErrors.isNotFound(stopped) {
            // Ephemeral: gone once stopped. Make sure, without waiting long.
            if let check = try? await control(cli.configGet(name, InstanceOwner.pidKey)),
                IncusErrors.isNotFound(check)
            {
                return
            }
        } else {
            log.info("\(cli.qualified(name)) did not stop within \(options.stopTimeout) s; killing it")
            _ = try? await control(cli.forceStop(name))
        }
        await delete(name)
    }
}

/// How far `systemctl is-system-running` says the boot got.
enum BootState: Equatable {
    case booted
    case noSystemd
    case waiting(String)
    case gone(String)

    init(_ result: CommandResult) {
        let state = result.outputText.trimmingCharacters(in: .whitespacesAndNewlines)
        let error = result.errorText
        switch state {
        case "running", "degraded", "maintenance":
            self = .booted
        case "stopping", "offline":
            self = .waiting(state)
        default:
            if case .exited(127) = result.status { self = .noSystemd; return }
            if error.contains("executable file not found")
                || error.contains("no such file or directory")
                    && error.contains("systemctl")
            {
                self = .noSystemd
            } else if IncusErrors.isNotFound(result) {
                self = .gone(error)
            } else {
                // "initializing"/"starting", "Failed to connect to bus", "VM agent isn't
                // currently running", "Instance is not running" while it restarts.
                self = .waiting(state.isEmpty ? error : state)
            }
        }
    }
}
