import Foundation
import Testing
import VirtCore

/// `Spawn.start`, the one posix_spawn of the servers and the tests: what the child gets and
/// what it must not.
@Suite("Spawning a child by hand")
struct SpawnTests {
    /// Runs `script` under /bin/sh with stdout to a file, waits for it, and returns the output.
    func run(
        _ script: String, environment: [String]? = nil, workingDirectory: String? = nil, newSession: Bool = false
    ) throws -> String {
        try run(
            argv: ["/bin/sh", "-c", script], environment: environment, workingDirectory: workingDirectory,
            newSession: newSession)
    }

    /// Runs `argv` with stdout to a file, waits for it, and returns the output.
    func run(
        argv: [String], environment: [String]? = nil, workingDirectory: String? = nil, newSession: Bool = false
    ) throws -> String {
        let directory = try PrivateDirectory.make(in: PrivateDirectory.temporaryParent, prefix: "dv-spawn.")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let output = "\(directory)/out"
        let pid = try Spawn.start(
            argv,
            actions: [
                .open(0, path: "/dev/null", flags: O_RDONLY),
                .open(1, path: output, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600), .duplicate(1, onto: 2),
            ], environment: environment, workingDirectory: workingDirectory, newSession: newSession)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        #expect(status == 0, "the script failed: \(status)")
        return try String(contentsOfFile: output, encoding: .utf8)
    }

    @Test("the child holds only 0, 1 and 2, even of a descriptor we left inheritable")
    func onlyStandardDescriptors() throws {
        // No close-on-exec: only Spawn's closing of strays keeps it from the child.
        let leaked = open("/dev/null", O_RDONLY)
        try #require(leaked >= 0)
        defer { close(leaked) }
        // The shell's descriptors, listed by a child of it (`; true` keeps the shell from
        // becoming ls, whose listing would hold its own directory descriptor).
        let listing = try run("ls /proc/$$/fd; true")
        #expect(listing.split(separator: "\n").sorted() == ["0", "1", "2"], "\(listing)")
    }

    @Test("environment, working directory and a session of its own are the caller's to give")
    func environmentDirectorySession() throws {
        let output = try run(
            #"echo "$SPAWN_TEST_VALUE"; pwd; [ "$(ps -o sid= -p $$ | tr -d ' ')" = "$$" ] && echo leader"#,
            environment: ["SPAWN_TEST_VALUE=given", "PATH=/usr/bin:/bin"], workingDirectory: "/usr/share",
            newSession: true)
        #expect(output == "given\n/usr/share\nleader\n", "\(output)")
        let inherited = try run(
            #"echo "${SPAWN_TEST_VALUE:-unset}"; [ "$(ps -o sid= -p $$ | tr -d ' ')" = "$$" ] || echo member"#)
        #expect(inherited == "unset\nmember\n", "\(inherited)")
    }

    @Test("a signal this thread blocks is not blocked in the child")
    func signalsReset() throws {
        // Per thread, so no other test sees it; this function is synchronous, so it stays on
        // the thread it blocked in until it unblocks.
        var blocked = sigset_t()
        sigemptyset(&blocked)
        sigaddset(&blocked, SIGUSR2)
        var previous = sigset_t()
        pthread_sigmask(SIG_BLOCK, &blocked, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        // grep reads its own status: a shell would show its own mask, which dash blocks wholly
        // while it waits for a child.
        let line = try run(argv: ["/bin/grep", "^SigBlk:", "/proc/self/status"])
        let mask = UInt64(
            line.split(separator: "\t").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "", radix: 16)
        try #require(mask != nil, "\(line)")
        #expect((mask ?? 0) & (1 << UInt64(SIGUSR2 - 1)) == 0, "\(line)")
    }

    @Test("what cannot start is an error naming the program, with the system's reason")
    func missingProgram() {
        let error = #expect(throws: VirtError.self) {
            _ = try Spawn.start(["/nonexistent/program"], actions: [])
        }
        #expect(error?.message.contains("cannot start /nonexistent/program") == true, "\(String(describing: error))")
        #expect(error?.underlying == ENOENT)
        #expect(throws: VirtError.self) { _ = try Spawn.start([], actions: []) }
    }
}

@Suite("Text from C buffers")
struct CBufferTextTests {
    @Test("a buffer a C function filled reads up to its first NUL, or whole without one")
    func nulTerminated() {
        var buffer = [CChar](repeating: 0x41, count: 8)
        buffer[3] = 0
        #expect(String(nulTerminated: buffer) == "AAA")
        #expect(String(nulTerminated: [0x68, 0x6F, 0x73, 0x74]) == "host")
        #expect(String(nulTerminated: []) == "")
        var path = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        #expect(realpath("/usr/../etc", &path) != nil)
        #expect(String(nulTerminated: path) == "/etc")
    }
}

@Suite("Telling whether a process still runs")
struct LiveProcessTests {
    @Test("a pid is the process it names only while it runs with the start time recorded for it")
    func startTimes() throws {
        let me = getpid()
        let started = try #require(LiveProcess.startTime(of: me))
        // This test's own processes: /proc shows them, so both rules agree.
        for unreadable in [LiveProcess.UnreadableStart.owner, .ownerIfOurs] {
            #expect(LiveProcess.isProcess(me, startedAt: started, unreadable: unreadable))
            // Not recorded (an older owner): any process under the pid counts.
            #expect(LiveProcess.isProcess(me, startedAt: "", unreadable: unreadable))
            // Recorded otherwise: the pid was recycled.
            #expect(!LiveProcess.isProcess(me, startedAt: "1", unreadable: unreadable))
            #expect(!LiveProcess.isProcess(Int32.max - 7, startedAt: "", unreadable: unreadable))
        }
        #expect(LiveProcess.parent(of: me) == getppid())
        #expect(LiveProcess.parent(of: Int32.max - 7) == nil)
    }

    @Test("a zombie has ended")
    func zombie() throws {
        let child = try Spawn.start(["/bin/true"], actions: [], environment: [], workingDirectory: nil)
        defer { _ = waitpid(child, nil, 0) }
        // Not reaped: it stays a zombie until the deferred waitpid.
        var state: Character?
        for _ in 0..<500 {
            state = LiveProcess.state(of: child)
            if state == "Z" { break }
            usleep(10_000)
        }
        #expect(state == "Z")
        #expect(!LiveProcess.isRunning(child))
        #expect(!LiveProcess.isProcess(child, startedAt: "", unreadable: .owner))
    }
}
