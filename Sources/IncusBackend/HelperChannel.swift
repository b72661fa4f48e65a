import CommandRunner
import Glibc
import GuestHelper
import NIOCore
import NIOPosix
import Synchronization
import VirtCore

/// The guest helper in an Incus instance: the QEMU backend's helper program, run by one
/// long-lived `incus exec` whose stdin and stdout carry its frames, and served to auxverb clients
/// by an ``AuxverbRelay`` on a socket in a private directory. A command then costs a frame each
/// way on an open stream instead of an `incus exec` of its own (about 55 ms here).
///
/// One relay for the server's life; the helper is started in each instance the testbed runs
/// (open, revert), and again whenever it ends while the instance is its current one (a reboot,
/// a test that kills it): meanwhile commands fail at once, as in a rebooting VM. An instance
/// without python3 gets no helper: the server says so once, and commands go through
/// `incus exec` each (``AuxverbWrapper``) from then on.
final class HelperChannel: Sendable {
    let relay: AuxverbRelay
    /// The private directory (0700) holding the relay's socket.
    let directory: String
    private let cli: IncusCLI
    private let runner: any CommandRunner
    private let state = Mutex(State())

    private struct State {
        var serving: Task<Void, Never>?
        /// Keeps a helper running in the current instance.
        var supervisor: Task<Void, Never>?
        /// Why the helper cannot run in this image's instances: set when it ended before its
        /// hello (no python3), so later instances go without at once.
        var unavailable: String?
        /// The fallback has been announced on stderr.
        var announced = false
        var closed = false
    }

    init(
        cli: IncusCLI, runner: any CommandRunner, parent: String = PrivateDirectory.temporaryParent
    )
        throws(VirtError)
    {
        // A unix socket's path has room for 107 bytes: with a longer TMPDIR the relay could not
        // bind, so there is no helper (said here, before anything is made).
        let longest = "\(parent)/\(Self.directoryPrefix)XXXXXX/\(Self.socketName)"
        guard longest.utf8.count <= 107 else {
            throw VirtError(.usage, "the relay's socket path \(longest) would be too long for a unix socket")
        }
        self.cli = cli
        self.runner = runner
        directory = try PrivateDirectory.make(in: parent, prefix: Self.directoryPrefix)
        relay = AuxverbRelay(socketPath: "\(directory)/\(Self.socketName)")
        do throws(VirtError) {
            try OwnedDirectory.claim(directory)
        } catch {
            unlink("\(directory)/\(OwnedDirectory.ownerFileName)")
            rmdir(directory)
            throw error
        }
    }

    static let directoryPrefix = "dvi."
    static let socketName = "auxverb.sock"

    /// Removes the relay directories in `parent` that servers which have ended left behind (a
    /// SIGKILL gives a server no time for ``close()``). With `owner`, only that server's. A
    /// directory holding anything but the socket and the owner file is not ours, and one whose
    /// socket still has a listener is in use (a server that cannot be told by its owner file):
    /// both stay. Returns one line per directory removed.
    static func collectOrphans(parent: String = PrivateDirectory.temporaryParent, owner: pid_t? = nil) -> [String] {
        var report: [String] = []
        let orphans = OwnedDirectory.orphans(
            in: parent, prefix: directoryPrefix, program: "debusine-virt-incus", owner: owner)
        for directory in orphans {
            guard let names = DirectoryEntries.names(in: directory),
                names.allSatisfy({ $0 == socketName || $0 == OwnedDirectory.ownerFileName }),
                !isListening("\(directory)/\(socketName)")
            else { continue }
            for name in names { unlink("\(directory)/\(name)") }
            if rmdir(directory) == 0 {
                report.append("removed \(directory)")
            } else {
                report.append("could not remove \(directory): \(String(cString: strerror(errno)))")
            }
        }
        return report
    }

    /// How a helper's `incus exec` ended: its status when it ran, and the words for a message.
    struct End: Sendable, Equatable {
        var status: ProcessStatus?
        var description: String

        /// python3 is not in the image: `incus exec`'s status for a command it cannot find.
        var missingPython: Bool { status == .exited(127) }
    }

    /// Whether a process listens on the unix socket at `path`: a connection is taken, or
    /// waits in a full backlog. Closed at once; the relay takes that as a client gone.
    static func isListening(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        return UnixSocketAddress.connect(fd, to: path) == 0 || errno == EAGAIN || errno == EINPROGRESS
    }

    /// The command `incus exec` runs in the instance.
    static func command(_ cli: IncusCLI, _ name: String) -> Command {
        cli.exec(name, ["python3"] + GuestHelperScript.stdioArguments)
    }

    /// Starts the helper in `name`, which has just become the current instance, and waits for its
    /// hello. False when the instance cannot run it: its commands go through `incus exec` then.
    func start(in name: String) async -> Bool {
        await stop()
        let started: Bool = state.withLock { state in
            guard !state.closed, state.unavailable == nil else { return false }
            if state.serving == nil {
                let relay = self.relay
                state.serving = Task {
                    do throws(VirtError) {
                        try await relay.serve()
                    } catch {
                        // A start that sees this after its helper's hello goes without it.
                        log.debug("the auxverb relay stopped: \(error.message)")
                        self.state.withLock { $0.unavailable = error.message }
                    }
                }
            }
            return true
        }
        guard started else { return false }
        await relay.expectGuest()
        let firstEnd = Latch<End>()
        let cameUp = Latch<Bool>()
        let supervisor = Task { await self.supervise(name, firstEnd: firstEnd, cameUp: cameUp) }
        let kept = state.withLock { state -> Bool in
            guard !state.closed else { return false }
            state.supervisor = supervisor
            return true
        }
        guard kept else {
            supervisor.cancel()
            await supervisor.value
            return false
        }
        do throws(VirtError) {
            _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(30))
            if let broken = await relay.listenFailure {
                throw VirtError(.testbedFailure, broken)
            }
            log.debug("guest helper up in \(cli.qualified(name)) (\(GuestHelperScript.version))")
            cameUp.set(true)
            return true
        } catch {
            // Before the supervisor, which waits for this, could start another.
            cameUp.set(false)
            // Stopped meanwhile (a close): no news about the image.
            let stopped = state.withLock { $0.closed || $0.supervisor != supervisor }
            guard !stopped else {
                await stop()
                return false
            }
            // The relay itself failed: the exec is not to blame. Asked of the relay, which knows
            // before its serving task has ended.
            let relayFailure = await relay.listenFailure
            // The relay can see the stream's end before the supervisor has the exec's status.
            let ended =
                relayFailure != nil
                ? nil : try? await withTimeout(.seconds(15), "the helper's end") { try await firstEnd.wait() }
            await stop()
            let announce = state.withLock { state -> Bool in
                // Without python3 the helper ends so in every instance of the image; any other
                // failure (a busy host, an exec that failed once) is tried again in the next.
                if let ended, ended.missingPython { state.unavailable = ended.description }
                if let relayFailure { state.unavailable = relayFailure }
                defer { state.announced = true }
                return !state.closed && !state.announced
            }
            if announce {
                let why = ended?.description ?? error.message
                let instance = cli.qualified(name)
                let slower = "every command runs through an `incus exec` of its own, which is slower"
                if relayFailure != nil {
                    log.info("no guest helper in \(instance): \(why); \(slower)")
                } else if ended?.missingPython == true {
                    log.info(
                        "no guest helper in \(instance): \(why) (the helper needs python3 in the image); \(slower)")
                } else {
                    log.info("no guest helper in \(instance): \(why); \(slower) (the next instance tries again)")
                }
            }
            return false
        }
    }

    /// Stops the helper of the current instance (a revert is replacing it). Callers at the same
    /// time all wait for the same end.
    func stop() async {
        guard let supervisor = state.withLock({ $0.supervisor }) else { return }
        supervisor.cancel()
        await supervisor.value
        state.withLock { state in
            if state.supervisor == supervisor { state.supervisor = nil }
        }
        // A supervisor stopped before its first exec carried no stream: a start waiting for
        // its hello must not wait out its timeout.
        await relay.markLost()
    }

    /// Starts nothing from now on and stops the current helper: the first step of a close, taken
    /// before the instances go (a helper restarted in a stopping instance is no use).
    func shutdown() async {
        state.withLock { $0.closed = true }
        await stop()
    }

    /// Stops everything and removes the private directory. Idempotent.
    func close() async {
        let serving = state.withLock { state -> Task<Void, Never>? in
            state.closed = true
            defer { state.serving = nil }
            return state.serving
        }
        await stop()
        serving?.cancel()
        await serving?.value
        unlink(relay.socketPath)
        unlink("\(directory)/\(OwnedDirectory.ownerFileName)")
        rmdir(directory)
    }

    /// Runs the helper in `name` until cancelled, starting it again one second after it ends,
    /// once the first has come up (`cameUp`, the start's verdict). What the first run's end
    /// said (its status and stderr) goes to `firstEnd`, for the message of a start that failed.
    private func supervise(_ name: String, firstEnd: Latch<End>, cameUp: Latch<Bool>) async {
        var first = true
        while !Task.isCancelled {
            let ended = await runOnce(name)
            if Task.isCancelled { return }
            if first {
                firstEnd.set(ended)
                // A first helper that never came up is the start's to judge, not restarted here
                // (with a busy start, a restart could come before its verdict).
                guard (try? await cameUp.wait()) == true else { return }
            }
            first = false
            log.debug(
                "the guest helper in \(cli.qualified(name)) ended (\(ended.description)); starting another in 1 s")
            try? await Task.sleep(for: .seconds(1))
            guard !Task.isCancelled else { return }
            await relay.expectGuest()
        }
    }

    /// How one part of a helper's run ended.
    private enum RunEnd: Equatable {
        case exec(End)
        case carried
        case waited
    }

    /// One helper: a socket pair, one end the `incus exec`'s stdin and stdout, the other carried
    /// by the relay. The program goes first on the stream (``GuestHelperScript/stdioArguments``).
    /// Returns how it ended.
    private func runOnce(_ name: String) async -> End {
        var ends: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else {
            return End(description: "socketpair: \(VirtError.text(errno: errno))")
        }
        let (ours, theirs) = (ends[0], ends[1])
        let theirsOut = fcntl(theirs, F_DUPFD_CLOEXEC, 0)
        let program = Array(GuestHelperScript.source.utf8)
        guard theirsOut >= 0, (try? writeAll(ours, program, "the helper's program")) != nil else {
            Glibc.close(ours)
            Glibc.close(theirs)
            if theirsOut >= 0 { Glibc.close(theirsOut) }
            return End(description: "cannot hand the program to the helper")
        }
        let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.recvAllocator, value: AuxverbRelay.bulkReads)
                .withConnectedSocket(ours) {
                    channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            // NIO owns `ours` from the call on.
            Glibc.close(theirs)
            Glibc.close(theirsOut)
            return End(description: "cannot carry the helper's stream: \(error)")
        }
        let relay = self.relay
        let runner = self.runner
        let command = Self.command(cli, name)
        return await withTaskGroup(of: RunEnd.self) { group in
            group.addTask {
                let result = try? await runner.run(
                    command, input: .fileDescriptor(theirs, closeAfterStart: true),
                    output: .fileDescriptor(theirsOut, closeAfterStart: true), error: .capture(limit: 64 << 10))
                guard let result else { return .exec(End(description: "`incus exec` could not run")) }
                let stderr = result.errorText.split(separator: "\n").suffix(3).joined(separator: "; ")
                return .exec(
                    End(
                        status: result.status,
                        description: stderr.isEmpty ? "\(result.status)" : "\(result.status): \(stderr)"))
            }
            group.addTask {
                await relay.carry(channel)
                return .carried
            }
            // The exec's end closes the stream, and the stream's end (the helper gone) ends the
            // exec: whichever comes first, the other is given two seconds, so that the relay
            // delivers what the helper sent before it ended and the exec's status is known.
            var ended: End?
            var carried = false
            var waiting = false
            while let end = await group.next() {
                switch end {
                case .exec(let how): ended = how
                case .carried: carried = true
                case .waited: break
                }
                if (ended != nil && carried) || end == .waited { break }
                if !waiting {
                    waiting = true
                    group.addTask {
                        try? await Task.sleep(for: .seconds(2))
                        return .waited
                    }
                }
            }
            group.cancelAll()
            return ended ?? End(description: "its stream ended")
        }
    }
}
