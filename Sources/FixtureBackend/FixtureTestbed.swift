import CommandRunner
import Synchronization
import TestbedCore
import VirtCore

/// The in-test backend: a "testbed" that is a private directory on the host, entered with
/// `env TMPDIR=...`. It exercises the shared core for real (scratch directory, copies through
/// the auxverb, the reboot sequence) without a VM, so the protocol tests run in milliseconds.
///
/// Reboots are simulated: the boot id lives in a file, and a reboot wipes the testbed's tmp.
/// Revert wipes it too. Nothing here is used by the real servers.
public final class FixtureTestbed: Testbed {
    /// Behaviour switches, set with `KEY=VALUE` words (`@fixture` lines in transcripts).
    public struct Options: Sendable, Equatable {
        /// Capability words to advertise.
        public var capabilities = [Capability.revert, Capability.reboot]
        /// Make `open` fail with this message.
        public var failOpen: String?
        /// Make `revert` fail with this message.
        public var failRevert: String?
        /// Sleep this long in `open` (to deliver signals while opening).
        public var openDelay: Duration = .zero
        /// Sleep through a close during the open delay and make the testbed after it anyway: a
        /// backend whose boot goes on creating files while a shutdown removes them.
        public var openIgnoresClose = false
        /// Append `open` and `close` lines to this file, to prove cleanup ran.
        public var eventLog: String?
        /// Sleep this long before each copy (to run copies into their timeout).
        public var copyDelay: Duration = .zero
        /// Where the private directories are made; default $TMPDIR or /tmp.
        public var parentDirectory: String?

        public init() {}

        /// Parses `KEY=VALUE` words; unknown keys are usage errors.
        public init(words: [String]) throws(VirtError) {
            self.init()
            for word in words {
                guard let equals = word.firstIndex(of: "=") else {
                    throw VirtError(.usage, "fixture option \(word) is not KEY=VALUE")
                }
                let key = String(word[..<equals])
                let value = String(word[word.index(after: equals)...])
                switch key {
                case "caps": capabilities = value.split(separator: ",").map(String.init)
                case "fail-open": failOpen = value
                case "fail-revert": failRevert = value
                case "open-delay":
                    guard let seconds = Double(value) else {
                        throw VirtError(.usage, "open-delay needs seconds, not \(value)")
                    }
                    openDelay = .milliseconds(Int(seconds * 1000))
                case "copy-delay":
                    guard let seconds = Double(value) else {
                        throw VirtError(.usage, "copy-delay needs seconds, not \(value)")
                    }
                    copyDelay = .milliseconds(Int(seconds * 1000))
                case "open-ignores-close": openIgnoresClose = value == "1"
                case "event-log": eventLog = value
                case "parent": parentDirectory = value
                default: throw VirtError(.usage, "unknown fixture option \(key)")
                }
            }
        }
    }

    private let options: Options
    private let runner: any CommandRunner
    /// The private directory while open.
    private let root = Mutex<String?>(nil)
    /// The path of the first open's directory: a re-open uses it again, as a re-opened VM keeps
    /// its file system layout, so the scratch path the core re-creates stays inside it.
    private let firstRoot = Mutex<String?>(nil)
    /// Counts closes, so that an open in its delay notices one and stops, as a real backend's
    /// boot stops when its VM is destroyed.
    private let closes = Mutex(0)

    public init(options: Options, runner: any CommandRunner = SubprocessRunner()) {
        self.options = options
        self.runner = runner
    }

    /// The private directory, while the testbed is open.
    public var rootDirectory: String? { root.withLock { $0 } }

    public func capabilities() async -> [String] { options.capabilities }

    public func open() async throws(VirtError) -> [String] {
        record("open")
        if options.openDelay > .zero {
            let closesBefore = closes.withLock { $0 }
            let deadline = ContinuousClock.now + options.openDelay
            while ContinuousClock.now < deadline {
                do {
                    try await Task.sleep(for: min(.milliseconds(50), deadline - ContinuousClock.now))
                } catch {
                    throw VirtError(.testbedFailure, "open was interrupted")
                }
                if !options.openIgnoresClose && closes.withLock({ $0 }) != closesBefore {
                    throw VirtError(.testbedFailure, "the testbed was closed while opening")
                }
            }
        }
        if let failOpen = options.failOpen { throw VirtError(.testbedFailure, failOpen) }
        let directory: String
        if let previous = firstRoot.withLock({ $0 }) {
            guard mkdir(previous, 0o700) == 0 else {
                throw VirtError(.io, "cannot re-create \(previous)", errno: errno)
            }
            directory = previous
        } else {
            directory = try PrivateDirectory.make(
                in: options.parentDirectory ?? PrivateDirectory.temporaryParent, prefix: "dv-fixture.")
            firstRoot.withLock { $0 = directory }
        }
        root.withLock { $0 = directory }
        for sub in ["tmp", "saved"] where mkdir("\(directory)/\(sub)", 0o755) != 0 {
            throw VirtError(.io, "cannot create \(directory)/\(sub)")
        }
        try writeBootID(in: directory)
        return auxverb(directory)
    }

    public func revert() async throws(VirtError) -> [String] {
        if let failRevert = options.failRevert { throw VirtError(.testbedFailure, failRevert) }
        let directory = try requireRoot()
        try await wipeTmp(directory)
        return auxverb(directory)
    }

    public func close() async {
        closes.withLock { $0 += 1 }
        let directory = root.withLock { current -> String? in
            defer { current = nil }
            return current
        }
        if let directory {
            _ = try? await runner.run(Command("rm", ["-rf", "--", directory]))
        }
        record("close")
    }

    public func requestReboot(_ testbed: InTestbed) async throws(VirtError) {
        try await simulateBoot()
    }

    public func bootID(_ testbed: InTestbed) async throws(VirtError) -> String {
        let directory = try requireRoot()
        return try await runner.check(Command("cat", ["\(directory)/boot_id"]))
    }

    public func waitForReboot(
        _ testbed: InTestbed, previousBootID: String, requested: Bool
    ) async throws(VirtError) -> [String] {
        // With prepare-only a real test reboots the machine itself; here nobody would.
        if !requested { try await simulateBoot() }
        try await RebootSequence.pollForNewBootID(self, testbed, previousBootID: previousBootID)
        return testbed.auxverb
    }

    public func copy(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        if options.copyDelay > .zero {
            do {
                try await Task.sleep(for: options.copyDelay)
            } catch {
                throw VirtError(.timeout, "copy interrupted")
            }
        }
        try await CopyPlumbing.copy(request, testbed)
    }

    public var rebootSaveDirectories: [String] {
        guard let directory = rootDirectory else { return [] }
        return ["\(directory)/missing", "\(directory)/saved"]
    }

    public func debugFailureReport() async -> String? {
        "fixture testbed in \(rootDirectory ?? "(closed)")"
    }

    private func auxverb(_ directory: String) -> [String] { ["env", "TMPDIR=\(directory)/tmp"] }

    private func requireRoot() throws(VirtError) -> String {
        guard let directory = rootDirectory else { throw VirtError(.testbedFailure, "the fixture testbed is closed") }
        return directory
    }

    private func simulateBoot() async throws(VirtError) {
        let directory = try requireRoot()
        try await wipeTmp(directory)
        try writeBootID(in: directory)
    }

    private func wipeTmp(_ directory: String) async throws(VirtError) {
        try await runner.check(Command("rm", ["-rf", "--", "\(directory)/tmp"]))
        guard mkdir("\(directory)/tmp", 0o755) == 0 else { throw VirtError(.io, "cannot re-create \(directory)/tmp") }
    }

    private func writeBootID(in directory: String) throws(VirtError) {
        var generator = SystemRandomNumberGenerator()
        let id = (0..<2).map { _ in String(generator.next() as UInt64, radix: 16).leftPadded(to: 16) }.joined()
        let path = "\(directory)/boot_id"
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw VirtError(.io, "cannot write \(path)") }
        defer { Glibc.close(fd) }
        try writeAll(fd, Array((id + "\n").utf8), "cannot write \(path)")
    }

    private func record(_ event: String) {
        guard let path = options.eventLog else { return }
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        defer { Glibc.close(fd) }
        try? writeAll(fd, Array((event + "\n").utf8), "cannot write \(path)")
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
