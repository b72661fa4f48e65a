import GuestChannel
import Synchronization
import VirtCore

/// The auxverb through a command runner such as `incus exec NAME -- WRAPPER --framed`: runs
/// `runner + command` with its stdin and stdout carrying frames (the wrapper's framed mode),
/// its stderr ours. The command's stdout, stderr and exit come back as frames; stdin goes out as
/// frames. The runner's stdin is closed only once the exit frame is in: `incus exec` can lose
/// the last output of a process that ends right after writing it (several execs at once on a
/// busy host; seen with incus 6.0.4 in 2 to 4 % of short commands), and the wrapper does not end
/// before its stdin does.
///
/// Signals (TERM, INT, HUP) go to the runner, which passes them on (incus exec does, to the
/// wrapper, which passes them to the command). The runner has a process group of its own, so a
/// signal to our group (^C, sbuild's kill of the group) reaches the command once, through us.
///
/// The main thread never waits for the runner's stdin (the stdin pump may be blocked on it): it
/// reads the runner's output until the exit frame, whatever happens to our own stdout.
public enum FramedExec {
    /// Runs `runner + command`; returns the status to exit with, as ``AuxverbClient/run`` does.
    public static func run(runner: [String], command: [String]) -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        guard !runner.isEmpty, !command.isEmpty else { return FrameStreams.fail("no command given") }
        // Close-on-exec from the start: the child gets them as 0 and 1, no other child may hold them.
        guard let toRunner = SpawnHygiene.pipe(), let fromRunner = SpawnHygiene.pipe() else {
            return FrameStreams.fail("pipe: \(FrameStreams.errorText())")
        }
        let signals = FrameStreams.blockForwardedSignals()
        let pid: pid_t
        do {
            pid = try Spawn.start(
                runner + command, actions: [.duplicate(toRunner.read, onto: 0), .duplicate(fromRunner.write, onto: 1)],
                searchPath: true, newProcessGroup: true)
        } catch {
            return FrameStreams.fail(error.message)
        }
        close(toRunner.read)
        close(fromRunner.write)

        let input = FrameOutput(fd: toRunner.write)
        let child = Runner(pid: pid)
        FrameStreams.startThread { FrameStreams.forwardSignals(signals) { child.signal($0) } }
        FrameStreams.startThread { FrameStreams.pumpStandardInput(into: input, chunk: 64 << 10) }
        let output = StdoutWatch()
        let received = FrameStreams.receive(
            from: fromRunner.read, bufferSize: 1 << 18, stdoutGone: { readerGone(input, child, output) },
            afterOutput: { kind, count in if kind == .stdout { output.add(count) } })
        output.finish()
        switch received {
        case .end: break
        // A runner that sends garbage may not read its stdin either, and the stdin pump may be
        // blocked writing to it while it holds `input`.
        case .protocolError: child.killGroup()
        // Its stdout ends as it exits; one that lives on without it is killed for the same reason.
        case .lost: child.killGroupUnlessEnded(withinMilliseconds: 5000)
        }
        // The wrapper ends once its stdin does: close it, stop reading, then reap the runner.
        input.close()
        close(fromRunner.read)
        let status = child.reap()
        switch received {
        case .end(let end):
            if case .failed(let reason) = end { _ = FrameStreams.fail(reason) }
            return end.auxverbStatus
        case .lost:
            let exit = (status & 0x7f) == 0 ? "status \((status >> 8) & 0xff)" : "signal \(status & 0x7f)"
            return FrameStreams.fail("\(runner[0]) ended (\(exit)) before the command's end came through")
        case .protocolError(let error):
            return FrameStreams.fail("protocol error from the testbed's wrapper: \(error)")
        }
    }
}

extension FramedExec {
    /// Our reader went away: the frame that says so has the wrapper close the command's stdout,
    /// so that its next write there fails as on a closed pipe. The runner is killed instead (so
    /// that the auxverb ends) when that frame has not gone out in 5 s (it waits behind stdin the
    /// wrapper does not take: a command that reads none of its stdin while it writes on), or
    /// when stdout frames still come once it has had 2 s to act: it can sit unread behind that
    /// stdin (the wrapper stops reading once it holds 1 MiB the command has not taken). Checked
    /// each second until the command's end comes through.
    static func readerGone(_ input: FrameOutput, _ child: Runner, _ stdout: StdoutWatch) {
        let sentAt = Mutex<ContinuousClock.Instant?>(nil)
        FrameStreams.startThread {
            let clock = ContinuousClock()
            let gone = clock.now
            var sent = sentAt.withLock { $0 }
            while sent == nil {
                guard clock.now - gone < .seconds(5) else { return child.killGroup() }
                usleep(50_000)
                sent = sentAt.withLock { $0 }
            }
            if let grace = sent.map({ $0 + .seconds(2) - clock.now }), grace > .zero {
                usleep(UInt32(grace / .microseconds(1)))
            }
            var seen = stdout.total
            while !stdout.finished {
                sleep(1)
                let now = stdout.total
                guard now == seen || stdout.finished else { return child.killGroup() }
                seen = now
            }
        }
        input.send(FrameStreams.kill(SIGPIPE))
        sentAt.withLock { $0 = ContinuousClock().now }
    }
}

/// The command's stdout as the receiving thread sees it: bytes so far, and whether the
/// command's end has come through; read by the SIGPIPE thread.
final class StdoutWatch: Sendable {
    private let bytes = Atomic<Int>(0)
    private let ended = Atomic<Bool>(false)

    func add(_ count: Int) { bytes.add(count, ordering: .relaxed) }

    func finish() { ended.store(true, ordering: .releasing) }

    var total: Int { bytes.load(ordering: .relaxed) }

    var finished: Bool { ended.load(ordering: .acquiring) }
}

/// The runner process: signalled only until it is reaped, so a signal never reaches a process
/// that was given its pid afterwards.
final class Runner: Sendable {
    private let pid: pid_t
    private let reaped = Mutex(false)

    init(pid: pid_t) { self.pid = pid }

    func signal(_ number: Int32) {
        reaped.withLock { reaped in
            if !reaped { kill(pid, number) }
        }
    }

    /// SIGKILL to the runner's process group (it leads one): a runner that forked keeps no
    /// process holding its pipes.
    func killGroup() {
        reaped.withLock { reaped in
            if !reaped { kill(-pid, SIGKILL) }
        }
    }

    /// Gives the runner `milliseconds` to end (without reaping it), then kills its group.
    func killGroupUnlessEnded(withinMilliseconds milliseconds: Int) {
        for _ in 0..<(milliseconds / 10) {
            var info = siginfo_t()
            let result = waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT)
            // With WNOHANG and nothing to report, si_signo stays 0.
            if result < 0 && errno != EINTR || result == 0 && info.si_signo == SIGCHLD { return }
            usleep(10_000)
        }
        killGroup()
    }

    /// Waits for the runner to end and reaps it; returns its wait status.
    func reap() -> Int32 {
        var info = siginfo_t()
        while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR {}
        return reaped.withLock { reaped in
            reaped = true
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            return status
        }
    }
}
