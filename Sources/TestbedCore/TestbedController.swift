import CommandRunner
import VirtCore

/// The shared backend core: the protocol's state (open or not, the scratch path, the auxverb)
/// and every verb's semantics on top of a ``Testbed``.
///
/// State errors are ``VirtError/Code/protocolMisuse`` with upstream's messages; the session
/// loop turns them into exit 12.
public actor TestbedController {
    /// How a copy ended, as the protocol replies it.
    public enum CopyOutcome: Sendable, Equatable {
        case copied
        case failed(String)
        case timedOut
    }

    public let backend: any Testbed
    public let runner: any CommandRunner
    public let copyTimeout: Duration

    private var auxverb: [String]?
    /// The scratch path of the current session; kept across close so a re-open reuses it, as
    /// built trees may refer to absolute paths.
    private var scratch: String?
    private var isOpen = false
    /// Set from the start of `open` until the backend is closed: a half-made testbed (a VM still
    /// booting, a failed launch) needs its cleanup as much as an open one.
    private var needsClose = false
    private var closing: Task<Void, Never>?
    /// Opens and reverts in the backend right now. A shutdown (a signal) runs while they are
    /// suspended; what they make after its close (a directory, a process, an instance) would
    /// outlive the process, so the shutdown waits for them and closes again.
    private let creating = InFlight()

    /// How long the commands the controller runs in a new testbed may take: a few small
    /// processes, seconds even with four VMs under TCG on two cores. Five minutes unless a test
    /// says otherwise.
    public let setUpTimeout: Duration

    /// How long a shutdown waits for an open or revert its close cut short.
    static let creationGrace: Duration = .seconds(30)

    /// Where `--statistics-file` goes, if given.
    public let statistics: StatisticsFile?
    /// Samples the testbed's resources every ``sampleInterval`` while it is open and not being
    /// reverted or rebooted.
    private var sampler: Task<Void, Never>?
    /// Samplers cancelled and not waited for: a revert or reboot must not wait for a reading of
    /// the testbed it replaces. A shutdown waits for them, so no auxverb of theirs outlives it.
    private var retired: [Task<Void, Never>] = []
    static let sampleInterval: Duration = .seconds(3)
    /// A guest too busy to answer a sample in this time is asked again at the next one.
    static let sampleTimeout: Duration = .seconds(30)
    /// The sample at `close` delays the reply: a hung testbed must not hold it up for long.
    static let closingSampleTimeout: Duration = .seconds(10)

    public init(
        backend: any Testbed, runner: any CommandRunner = SubprocessRunner(), copyTimeout: Duration? = nil,
        statistics: StatisticsFile? = nil, setUpTimeout: Duration = .seconds(300)
    ) {
        self.setUpTimeout = setUpTimeout
        self.backend = backend
        self.runner = runner
        self.copyTimeout = copyTimeout ?? TestbedController.copyTimeoutFromEnvironment()
        self.statistics = statistics
    }

    /// AUTOPKGTEST_VIRT_COPY_TIMEOUT in seconds, 300 when unset or not a positive number.
    public static func copyTimeoutFromEnvironment() -> Duration {
        guard let raw = getenv("AUTOPKGTEST_VIRT_COPY_TIMEOUT"), let seconds = Int(String(cString: raw)),
            seconds > 0
        else { return .seconds(300) }
        return .seconds(seconds)
    }

    public func capabilities() async -> [String] {
        await backend.capabilities()
    }

    public func open() async throws(VirtError) -> String {
        guard !isOpen else { throw VirtError(.protocolMisuse, "`open' when already open") }
        let started = ContinuousClock.now
        closing = nil
        needsClose = true
        creating.enter()
        defer { creating.leave() }
        let auxverb = try await backend.open()
        try await failIfShutDown("opening")
        isOpen = true
        self.auxverb = auxverb
        let scratch = try await makeScratch(auxverb)
        try await failIfShutDown("opening")
        await changed(.opened(after: started.duration(to: .now)))
        return scratch
    }

    public func close() async throws(VirtError) {
        guard isOpen else { throw VirtError(.protocolMisuse, "`close' when not open") }
        if let statistics, let auxverb {
            // The last reading, of the testbed as the session left it; as the sampler, so that
            // a signal's shutdown meanwhile cancels it and waits for it.
            retireSampling()
            let backend = self.backend
            let testbed = InTestbed(auxverb: auxverb, runner: runner)
            let last = Task {
                await Self.sample(backend, testbed, into: statistics, timeout: Self.closingSampleTimeout)
            }
            sampler = last
            await last.value
        }
        await shutdown()
    }

    public func revert() async throws(VirtError) -> String {
        guard isOpen else { throw VirtError(.protocolMisuse, "`revert' when not open") }
        // Counted before the first suspension: a shutdown that runs meanwhile must wait for it.
        creating.enter()
        defer { creating.leave() }
        guard await backend.capabilities().contains(Capability.revert) else {
            throw VirtError(.protocolMisuse, "`revert' when `revert' not advertised")
        }
        let started = ContinuousClock.now
        retireSampling()
        let auxverb = try await backend.revert()
        try await failIfShutDown("reverting")
        self.auxverb = auxverb
        let scratch = try await makeScratch(auxverb)
        try await failIfShutDown("reverting")
        await changed(.reverted(after: started.duration(to: .now)))
        return scratch
    }

    public func reboot(prepareOnly: Bool) async throws(VirtError) {
        let (testbed, scratch) = try openState("reboot")
        guard await backend.capabilities().contains(Capability.reboot) else {
            throw VirtError(.protocolMisuse, "`reboot' when `reboot' not advertised")
        }
        retireSampling()
        auxverb = try await RebootSequence.run(
            backend, testbed, scratch: scratch, prepareOnly: prepareOnly, copyTimeout: copyTimeout)
        await changed(.rebooted)
    }

    /// The auxverb, for `print-execute-command`.
    public func executeCommand() throws(VirtError) -> [String] {
        try openState("print-execute-command").0.auxverb
    }

    /// Copies; a copy that fails or times out is an outcome (the session goes on), only
    /// misuse (not open) is thrown.
    public func copy(_ request: CopyRequest) async throws(VirtError) -> CopyOutcome {
        let testbed = try openState(request.direction == .down ? "copydown" : "copyup").0
        let backend = self.backend
        do {
            let request = try request.resolvingHostPath()
            try await withTimeout(copyTimeout, "copy") { try await backend.copy(request, testbed) }
            return .copied
        } catch let error where error.code == .timeout {
            return .timedOut
        } catch {
            return .failed(error.message)
        }
    }

    public func shell(directory: String, environment: [String]) async throws(VirtError) {
        let testbed = try openState("shell").0
        try await backend.shell(testbed, directory: directory, environment: environment)
    }

    public func debugFailureReport() async -> String? {
        await backend.debugFailureReport()
    }

    /// Destroys the testbed if it is open. Safe at any moment and any number of times,
    /// including while another call is suspended in the backend (signal handling uses it).
    public func shutdown() async {
        if let closing {
            await closing.value
            return
        }
        guard needsClose else { return }
        retireSampling()
        let samplers = retired
        retired = []
        let backend = self.backend
        let creating = self.creating
        let statistics = self.statistics
        let interrupted = creating.count > 0
        // Everything in this task, so that a second caller (a signal during `close`) waiting for
        // it does not end the process before the file is written.
        let task = Task {
            await backend.close()
            if interrupted {
                if !(await creating.waitUntilIdle(timeout: Self.creationGrace)) {
                    log.warning(
                        "an open or revert did not end within \(Self.creationGrace.formattedSeconds) of the shutdown")
                }
                await backend.close()
            }
            for sampler in samplers { await sampler.value }
            await statistics?.write()
        }
        closing = task
        await task.value
        isOpen = false
        needsClose = false
        auxverb = nil
    }

    /// What just happened to the testbed, for the statistics.
    private enum Change {
        case opened(after: Duration)
        case reverted(after: Duration)
        case rebooted
    }

    /// Records `change`, rewrites the statistics file and samples the new testbed.
    private func changed(_ change: Change) async {
        guard let statistics else { return }
        switch change {
        case .opened(let duration): await statistics.opened(after: duration)
        case .reverted(let duration): await statistics.reverted(after: duration)
        case .rebooted: break
        }
        await statistics.write()
        startSampling()
    }

    /// Starts sampling the open testbed: at once, then every ``sampleInterval``, the file
    /// rewritten after each sample.
    private func startSampling() {
        // Not after a shutdown began: an open or revert it cut short ends after it.
        guard let statistics, let auxverb, isOpen, closing == nil else { return }
        retireSampling()
        let backend = self.backend
        let testbed = InTestbed(auxverb: auxverb, runner: runner)
        sampler = Task {
            while !Task.isCancelled {
                await Self.sample(backend, testbed, into: statistics)
                guard !Task.isCancelled else { return }
                await statistics.write()
                try? await Task.sleep(for: Self.sampleInterval)
            }
        }
    }

    /// Stops sampling without waiting for a sample in flight (see ``retired``).
    private func retireSampling() {
        guard let sampler else { return }
        sampler.cancel()
        retired.append(sampler)
        self.sampler = nil
    }

    /// One sample of `testbed` into `statistics`; a failed or slow one is only logged (a guest
    /// may be too busy to answer, or rebooting by itself).
    private static func sample(
        _ backend: any Testbed, _ testbed: InTestbed, into statistics: StatisticsFile,
        timeout: Duration = sampleTimeout
    ) async {
        let full = await statistics.needsFullSample
        do {
            let sample = try await withTimeout(timeout, "a resource sample") {
                try await backend.resources(testbed, full: full)
            }
            await statistics.record(sample)
        } catch {
            log.debug("reading the testbed's resources failed: \(error.message)")
        }
    }

    private func openState(_ verb: String) throws(VirtError) -> (InTestbed, String) {
        guard isOpen, let auxverb, let scratch else {
            throw VirtError(.protocolMisuse, "`\(verb)' when not open")
        }
        return (InTestbed(auxverb: auxverb, runner: runner), scratch)
    }

    /// Throws when a shutdown ran while an open or revert was `doing` its work in the backend, or
    /// in the testbed it made (the scratch directory, ``Testbed/learn(_:)``): whatever it made
    /// after the shutdown's close must go too, and its path must not send the client on.
    private func failIfShutDown(_ doing: String) async throws(VirtError) {
        guard closing != nil else { return }
        await backend.close()
        throw VirtError(.testbedFailure, "the testbed was shut down while \(doing)")
    }

    /// Creates the scratch directory, or re-creates it at the same path after revert and
    /// re-open, while the backend reads what it learns from the new testbed (``Testbed/learn(_:)``).
    ///
    /// Bounded by ``setUpTimeout``: a testbed that came up but does not run a command (a stuck
    /// guest helper, a container whose exec hangs) fails its open or revert with a clear error
    /// instead of holding it, and its client, for good.
    private func makeScratch(_ auxverb: [String]) async throws(VirtError) -> String {
        let mode = ScratchDirectory.mode(await backend.capabilities())
        let testbed = InTestbed(auxverb: auxverb, runner: runner)
        let backend = self.backend
        let scratch = self.scratch
        log.debug("making the scratch directory in the new testbed")
        let path = try await withTimeout(setUpTimeout, "creating the scratch directory in the new testbed") {
            () async throws(VirtError) -> String in
            async let learned: Void = backend.learn(testbed)
            let path: String
            if let scratch {
                try await testbed.check(["install", "-d", "-m", mode, "--", scratch])
                path = scratch
            } else {
                path = try await ScratchDirectory.make(in: testbed, mode: mode)
            }
            await learned
            return path
        }
        self.scratch = path
        return path
    }
}
