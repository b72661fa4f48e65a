import Glibc
import GuestChannel

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
        guard !runner.isEmpty, !command.isEmpty else { return AuxverbClient.fail("no command given") }
        var toRunner: [Int32] = [-1, -1]
        var fromRunner: [Int32] = [-1, -1]
        guard pipe(&toRunner) == 0, pipe(&fromRunner) == 0 else {
            return AuxverbClient.fail("pipe: \(AuxverbClient.errorText())")
        }
        // Ours only: the child gets them as 0 and 1, and no other child of ours may hold them.
        for fd in [toRunner[1], fromRunner[0]] { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }

        var forwarded = sigset_t()
        sigemptyset(&forwarded)
        for number in [SIGTERM, SIGINT, SIGHUP] { sigaddset(&forwarded, number) }
        pthread_sigmask(SIG_BLOCK, &forwarded, nil)

        let pid: pid_t
        switch spawn(runner + command, stdin: toRunner[0], stdout: fromRunner[1]) {
        case .success(let spawned): pid = spawned
        case .failure(let message): return AuxverbClient.fail(message)
        }
        close(toRunner[0])
        close(fromRunner[1])

        let output = RunnerInput(fd: toRunner[1])
        let child = Runner(pid: pid)
        let signalSet = forwarded
        AuxverbClient.startThread { forwardSignals(signalSet, to: child) }
        AuxverbClient.startThread { pumpStandardInput(output) }
        let end = receive(fromRunner[0], output)
        // The wrapper ends once its stdin does: close it, stop reading, then reap the runner.
        output.close()
        close(fromRunner[0])
        let status = child.reap()
        guard let end else {
            let exit = (status & 0x7f) == 0 ? "status \((status >> 8) & 0xff)" : "signal \(status & 0x7f)"
            return AuxverbClient.fail("\(runner[0]) ended (\(exit)) before the command's end came through")
        }
        if case .failed(let reason) = end { _ = AuxverbClient.fail(reason) }
        return end.auxverbStatus
    }

    /// Reads frames until the exit frame; nil when the runner's stdout ended first.
    static func receive(_ fd: Int32, _ output: RunnerInput) -> CommandEnd? {
        var decoder = FrameDecoder()
        var buffer = [UInt8](repeating: 0, count: 1 << 18)
        var stdoutBroken = false
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return nil }
            decoder.append(buffer[0..<count])
            while true {
                let frame: Frame?
                do {
                    frame = try decoder.next()
                } catch {
                    _ = AuxverbClient.fail("protocol error from the testbed's wrapper: \(error)")
                    return nil
                }
                guard let frame else { break }
                switch frame.kind {
                case .stdout, .stderr:
                    let target: Int32 = frame.kind == .stdout ? 1 : 2
                    if !stdoutBroken || target == 2, !AuxverbClient.writeAll(target, frame.payload), target == 1 {
                        // Our reader went away: the command would get SIGPIPE writing to it.
                        // Sent from a thread of its own (the stdin pump may hold the runner's
                        // stdin until the wrapper reads again, which needs us reading on).
                        stdoutBroken = true
                        AuxverbClient.startThread { output.send(Frame(.kill, Array("\(SIGPIPE)".utf8))) }
                    }
                case .exit:
                    return CommandEnd(payload: frame.payload)
                default:
                    continue
                }
            }
        }
    }

    static func pumpStandardInput(_ output: RunnerInput) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 {
                output.send(Frame(.stdinEOF))
                return
            }
            guard output.send(Frame(.stdin, Array(buffer[0..<count]))) else { return }
        }
    }

    static func forwardSignals(_ set: sigset_t, to runner: Runner) {
        var set = set
        while true {
            var number: Int32 = 0
            guard sigwait(&set, &number) == 0 else { return }
            runner.signal(number)
        }
    }

    enum Spawned {
        case success(pid_t)
        case failure(String)
    }

    /// posix_spawnp with `stdin` and `stdout` as the child's 0 and 1, every signal at its default
    /// and none blocked (this process blocks the forwarded ones for its signal thread).
    static func spawn(_ argv: [String], stdin: Int32, stdout: Int32) -> Spawned {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdin, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        for fd in [stdin, stdout] where fd > 2 { posix_spawn_file_actions_addclose(&actions, fd) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var all = sigset_t()
        sigfillset(&all)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(
            &attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP))
        var pid: pid_t = 0
        let cArguments = argv.map { strdup($0) } + [nil]
        defer { for argument in cArguments { free(argument) } }
        let result = posix_spawnp(&pid, argv[0], &actions, &attributes, cArguments, environ)
        guard result == 0 else {
            return .failure("cannot run \(argv[0]): \(String(cString: strerror(result)))")
        }
        return .success(pid)
    }
}

/// The runner's stdin: whole frames written under a lock (the stdin pump and the main thread
/// write), and closed once, after which nothing more is written.
final class RunnerInput: @unchecked Sendable {
    private let fd: Int32
    private var lock = pthread_mutex_t()
    private var closed = false

    init(fd: Int32) {
        self.fd = fd
        pthread_mutex_init(&lock, nil)
    }

    @discardableResult
    func send(_ frame: Frame) -> Bool {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        guard !closed else { return false }
        return AuxverbClient.writeAll(fd, frame.encoded)
    }

    func close() {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        guard !closed else { return }
        closed = true
        _ = Glibc.close(fd)
    }
}

/// The runner process: signalled only until it is reaped, so a signal never reaches a process
/// that was given its pid afterwards.
final class Runner: @unchecked Sendable {
    private let pid: pid_t
    private var lock = pthread_mutex_t()
    private var reaped = false

    init(pid: pid_t) {
        self.pid = pid
        pthread_mutex_init(&lock, nil)
    }

    func signal(_ number: Int32) {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        if !reaped { kill(pid, number) }
    }

    /// Waits for the runner to end and reaps it; returns its wait status.
    func reap() -> Int32 {
        var info = siginfo_t()
        while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR {}
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        reaped = true
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status
    }
}
