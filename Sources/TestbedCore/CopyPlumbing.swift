import CommandRunner
import Foundation
import Synchronization
import TarFormat
import VirtCore

/// One `copydown` or `copyup` request.
public struct CopyRequest: Sendable, Equatable {
    public enum Direction: Sendable, Equatable {
        /// Host to testbed.
        case down
        /// Testbed to host.
        case up
    }

    public var direction: Direction
    public var hostPath: String
    public var testbedPath: String
    /// Both paths ended in `/`: copy the directory's contents, merging into the target.
    public var isDirectory: Bool

    public init(direction: Direction, hostPath: String, testbedPath: String, isDirectory: Bool) {
        self.direction = direction
        self.hostPath = hostPath
        self.testbedPath = testbedPath
        self.isDirectory = isDirectory
    }

    /// Builds a request from the two protocol arguments (source first), checking the rules
    /// the protocol sets: both non-empty, and both or neither ending in `/`.
    ///
    /// Paths are taken as autopkgtest's own servers take them: a relative host path is relative
    /// to this process's working directory at the time of the request, which is the client's
    /// (`autopkgtest . -- ...`, `-o out` send such paths; see ``resolvingHostPath()``); a
    /// testbed path goes to the testbed as it is.
    public static func fromProtocol(
        _ direction: Direction, source: String, destination: String
    ) throws(VirtError) -> CopyRequest {
        let verb = direction == .down ? "copydown" : "copyup"
        guard !source.isEmpty, !destination.isEmpty else {
            throw VirtError(.protocolMisuse, "\(verb) paths must be nonempty")
        }
        let isDirectory = source.hasSuffix("/")
        guard isDirectory == destination.hasSuffix("/") else {
            throw VirtError(
                .protocolMisuse,
                "\(verb) paths must agree about directoryness (presence or absence of trailing /)")
        }
        let (host, testbed) = direction == .down ? (source, destination) : (destination, source)
        return CopyRequest(direction: direction, hostPath: host, testbedPath: testbed, isDirectory: isDirectory)
    }

    /// This request with its host path absolute: a relative one joined to the working directory
    /// now (its trailing `/` kept, as it says what kind of copy this is), so that no later step
    /// depends on where it runs.
    public func resolvingHostPath() throws(VirtError) -> CopyRequest {
        var resolved = self
        resolved.hostPath = try Self.absoluteHostPath(hostPath)
        return resolved
    }

    static func absoluteHostPath(_ path: String) throws(VirtError) -> String {
        guard let resolved = AbsolutePath.resolving(path) else {
            throw VirtError(
                .copyFailed, "cannot resolve the relative path \(path): the working directory is gone", errno: errno)
        }
        return resolved
    }
}

/// Copies through the auxverb: files with `cat`, directories as tar streams, data flowing
/// through pipes and never held in memory. Any backend can use it; backends with a faster path
/// replace ``Testbed/copy(_:_:)``.
public enum CopyPlumbing {
    public static func copy(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        guard !request.hostPath.utf8.contains(0), !request.testbedPath.utf8.contains(0) else {
            throw VirtError(.copyFailed, "paths must not contain NUL bytes")
        }
        switch (request.direction, request.isDirectory) {
        case (.down, false): try await copyFileDown(request, testbed)
        case (.up, false): try await copyFileUp(request, testbed)
        case (.down, true): try await copyDirectoryDown(request, testbed)
        case (.up, true): try await copyDirectoryUp(request, testbed)
        }
    }

    /// Writes stdin to $1, then makes it executable when $2 says so.
    static let receiveFileScript = #"cat > "$1"; if [ "$2" = x ]; then chmod +x -- "$1"; fi"#

    /// Sends $1 on stdout and reports through exit status 3 that it is executable, saving a
    /// second round trip into the testbed.
    public static let sendFileScript = #"cat -- "$1"; if [ -x "$1" ]; then exit 3; fi"#

    /// Makes the target directory itself but not its parents, as autopkgtest's servers do: a
    /// copy into a directory whose parent is missing fails there too.
    static let receiveTreeScript =
        #"if ! test -d "$1"; then mkdir -- "$1"; fi; cd -- "$1"; tar --warning=none --preserve-permissions --extract --no-same-owner -f -"#

    static let sendTreeScript = #"cd -- "$1"; tar --warning=none --create -f - ."#

    static func copyFileDown(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        let fd = try openHost(request.hostPath, flags: O_RDONLY)
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) != S_IFDIR else {
            close(fd)
            throw VirtError(.copyFailed, "\(request.hostPath) is not a file")
        }
        let executable = info.st_mode & 0o111 != 0 ? "x" : "-"
        let result = try await testbed.run(
            ["/bin/sh", "-ec", receiveFileScript, "sh", request.testbedPath, executable],
            input: .fileDescriptor(fd, closeAfterStart: true), output: .discard)
        try require(result, "copying \(request.hostPath) to the testbed's \(request.testbedPath)")
    }

    static func copyFileUp(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        // A copy that fails (no such file in the testbed, a testbed gone) must leave the
        // destination as it was: the data goes to a new file beside it, renamed over it once
        // whole, with the mode of the file it replaces. Only a device or a FIFO the client named
        // (`/dev/null`) is written in place, as it cannot be replaced without changing what it
        // is. A symbolic link is replaced, never written through: one that an earlier copyup of
        // a directory brought from the testbed could point anywhere on the host.
        var existing = stat()
        let found = lstat(request.hostPath, &existing) == 0
        let type = existing.st_mode & S_IFMT
        let inPlace = found && (type == S_IFCHR || type == S_IFBLK || type == S_IFIFO)
        let (fd, target) =
            inPlace
            ? (
                try openHost(request.hostPath, flags: O_WRONLY | O_TRUNC | O_NOFOLLOW, mode: 0o666),
                request.hostPath
            )
            : try createBeside(request.hostPath)
        if found && type == S_IFREG { fchmod(fd, existing.st_mode & 0o777) }
        let discard = { if !inPlace { unlink(target) } }
        let command =
            testbed.fileReader.map { Command(argv: $0 + [request.testbedPath]) }
            ?? testbed.command(["/bin/sh", "-ec", sendFileScript, "sh", request.testbedPath])
        let result: CommandResult
        do {
            result = try await testbed.runner.run(
                command, input: .none, output: .fileDescriptor(fd, closeAfterStart: true), error: .capture)
        } catch {
            discard()
            throw error
        }
        let executable = result.status == .exited(3)
        let status = executable ? CommandResult(status: .exited(0), standardError: result.standardError) : result
        do {
            try require(status, "copying the testbed's \(request.testbedPath) to \(request.hostPath)")
        } catch {
            discard()
            throw error
        }
        if executable && !inPlace {
            var info = stat()
            if stat(target, &info) == 0 {
                // Execute bits follow the read bits, as `chmod +x` under the usual umask would.
                let mode = info.st_mode & 0o7777
                chmod(target, mode | ((mode & 0o444) >> 2))
            }
        }
        if !inPlace && rename(target, request.hostPath) != 0 {
            let number = errno
            discard()
            throw VirtError(.copyFailed, "cannot move the copy to \(request.hostPath)", errno: number)
        }
    }

    /// A new, empty file in `path`'s directory (mode 0666 less the umask, as `open` would make
    /// `path`), under a name of our own that fits any file system's name limit.
    static func createBeside(_ path: String) throws(VirtError) -> (Int32, String) {
        let directory = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<16 {
            let name = "\(directory)/.debusine-virt-copy.\(getpid()).\(String(generator.next() as UInt32, radix: 16))"
            let fd = open(name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
            if fd >= 0 { return (fd, name) }
            if errno != EEXIST { break }
        }
        throw VirtError(.copyFailed, "cannot create a file beside \(path)", errno: errno)
    }

    static func copyDirectoryDown(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        var info = stat()
        guard stat(request.hostPath, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
            throw VirtError(.copyFailed, "\(request.hostPath) is not a directory")
        }
        let local = Command("tar", ["--warning=none", "--directory", request.hostPath, "--create", "-f", "-", "."])
        let remote = testbed.command(["/bin/sh", "-ec", receiveTreeScript, "sh", request.testbedPath])
        try await pipeline(from: local, to: remote, testbed.runner, "copying \(request.hostPath) to the testbed")
    }

    static func copyDirectoryUp(_ request: CopyRequest, _ testbed: InTestbed) async throws(VirtError) {
        // The destination itself, not its parents (the client makes those), as upstream does.
        if mkdir(request.hostPath, 0o777) != 0 && errno != EEXIST {
            throw VirtError(.copyFailed, "cannot create \(request.hostPath)", errno: errno)
        }
        let remote = testbed.command(["/bin/sh", "-ec", sendTreeScript, "sh", request.testbedPath])
        // The testbed's archive is untrusted: it passes the safety filter, and the host's tar
        // keeps the destination's own mode and makes what arrives with the user's umask (as
        // tar does for anyone but root), never with the archive's setuid or world-write bits.
        let local = Command(
            "tar",
            [
                "--warning=none", "--directory", request.hostPath, "--extract", "--no-same-owner",
                "--no-same-permissions", "--no-overwrite-dir", "-f", "-",
            ])
        let what = "copying the testbed's \(request.testbedPath)"
        let outcome = try await pipeline(from: remote, filteredBy: TarSafetyFilter(), to: local, testbed.runner, what)
        if !outcome.leftOut.isEmpty {
            let shown = outcome.leftOut.prefix(10).joined(separator: ", ")
            let more = outcome.leftOut.count > 10 ? " and \(outcome.leftOut.count - 10) more" : ""
            log.warning(
                "copyup of \(request.testbedPath): left out what the host does not take from a testbed: \(shown)\(more)"
            )
        }
    }

    /// Runs `source | filter | destination`: the filter on a thread of its own (it blocks on
    /// pipes), between two pipes. A filter error comes first in what is thrown: it says what was
    /// wrong with the stream, where the destination would only see it cut short.
    static func pipeline(
        from source: Command, filteredBy filter: TarSafetyFilter, to destination: Command,
        _ runner: any CommandRunner, _ what: String
    ) async throws(VirtError) -> TarSafetyFilter.Outcome {
        guard let (sourceRead, sourceWrite) = SpawnHygiene.pipe() else {
            throw VirtError(.io, "\(what): cannot create a pipe", errno: errno)
        }
        guard let (filteredRead, filteredWrite) = SpawnHygiene.pipe() else {
            let number = errno
            close(sourceRead)
            close(sourceWrite)
            throw VirtError(.io, "\(what): cannot create a pipe", errno: number)
        }
        let filtering = FilterThread.start { () throws(VirtError) -> TarSafetyFilter.Outcome in
            // The reader and writer own the descriptors: the destination sees EOF, and the source
            // EPIPE, as soon as the filter is done.
            try filter.filter(
                BlockReader(fd: sourceRead, name: "the testbed's archive"),
                into: BlockWriter(fd: filteredWrite, name: "the host's tar"))
        }
        let results: (CommandResult, CommandResult)
        do {
            results = try await withThrowingTaskGroup(of: (Int, CommandResult).self) { group in
                group.addTask {
                    (
                        0,
                        try await runner.run(
                            source, input: .none, output: .fileDescriptor(sourceWrite, closeAfterStart: true),
                            error: .capture)
                    )
                }
                group.addTask {
                    (
                        1,
                        try await runner.run(
                            destination, input: .fileDescriptor(filteredRead, closeAfterStart: true),
                            output: .discard, error: .capture)
                    )
                }
                var byIndex: [Int: CommandResult] = [:]
                for try await (index, result) in group { byIndex[index] = result }
                guard let first = byIndex[0], let second = byIndex[1] else {
                    throw VirtError(.internalError, "\(what): a side of the pipeline did not report")
                }
                return (first, second)
            }
        } catch let error as VirtError {
            // Not waited for: a destination that never started leaves the filter blocked on a
            // full pipe. It owns its descriptors and ends with the source.
            throw error
        } catch {
            throw VirtError(.copyFailed, "\(what): \(error)")
        }
        let (sourceResult, destinationResult) = results
        let outcome: TarSafetyFilter.Outcome
        switch await filtering.value {
        case .success(let value): outcome = value
        case .failure(let error):
            let detail = destinationResult.status.succeeded ? "" : "; the host's tar: \(destinationResult.errorText)"
            throw VirtError(.copyFailed, "\(what) failed: \(error.message)\(detail)")
        }
        try require(destinationResult, what)
        if sourceResult.status != .signaled(SIGPIPE) {
            try require(sourceResult, what)
        }
        return outcome
    }

    /// Runs `source | destination` with a pipe between them, both concurrently.
    static func pipeline(
        from source: Command, to destination: Command, _ runner: any CommandRunner, _ what: String
    ) async throws(VirtError) {
        guard let (readEnd, writeEnd) = SpawnHygiene.pipe() else {
            throw VirtError(.io, "\(what): cannot create a pipe", errno: errno)
        }
        let results: (CommandResult, CommandResult)
        do {
            results = try await withThrowingTaskGroup(of: (Int, CommandResult).self) { group in
                group.addTask {
                    (
                        0,
                        try await runner.run(
                            source, input: .none, output: .fileDescriptor(writeEnd, closeAfterStart: true),
                            error: .capture)
                    )
                }
                group.addTask {
                    (
                        1,
                        try await runner.run(
                            destination, input: .fileDescriptor(readEnd, closeAfterStart: true), output: .discard,
                            error: .capture)
                    )
                }
                var byIndex: [Int: CommandResult] = [:]
                for try await (index, result) in group { byIndex[index] = result }
                guard let first = byIndex[0], let second = byIndex[1] else {
                    throw VirtError(.internalError, "\(what): a side of the pipeline did not report")
                }
                return (first, second)
            }
        } catch let error as VirtError {
            throw error
        } catch {
            throw VirtError(.copyFailed, "\(what): \(error)")
        }
        let (sourceResult, destinationResult) = results
        try require(destinationResult, what)
        // A reader that finished early leaves the writer with SIGPIPE; the copy itself is whole.
        if sourceResult.status != .signaled(SIGPIPE) {
            try require(sourceResult, what)
        }
    }

    static func require(_ result: CommandResult, _ what: String) throws(VirtError) {
        guard result.status.succeeded else {
            let detail = result.errorText.isEmpty ? "" : ": \(result.errorText)"
            throw VirtError(.copyFailed, "\(what) failed (\(result.status))\(detail)")
        }
    }

    static func openHost(_ path: String, flags: Int32, mode: mode_t = 0) throws(VirtError) -> Int32 {
        let fd = open(path, flags | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw VirtError(.copyFailed, "cannot open \(path)", errno: errno)
        }
        return fd
    }
}

/// Blocking work on a thread of its own, awaited as a task: the filter waits on pipes, which a
/// task must not do on the cooperative pool (two threads on two cores).
final class FilterThread<Value: Sendable>: Sendable {
    private let state = Mutex<
        (result: Result<Value, VirtError>?, waiter: CheckedContinuation<Result<Value, VirtError>, Never>?)
    >((nil, nil))

    static func start(_ body: @escaping @Sendable () throws(VirtError) -> Value) -> FilterThread {
        let thread = FilterThread()
        let worker = Thread {
            // A reader that went away must be an EPIPE here, not the death of the process
            // (test runners do not ignore SIGPIPE as the servers do): SIGPIPE from write() goes
            // to the writing thread, so blocking it here is enough.
            var pipeSignal = sigset_t()
            sigemptyset(&pipeSignal)
            sigaddset(&pipeSignal, SIGPIPE)
            pthread_sigmask(SIG_BLOCK, &pipeSignal, nil)
            let result: Result<Value, VirtError>
            do throws(VirtError) { result = .success(try body()) } catch { result = .failure(error) }
            thread.finish(result)
        }
        worker.start()
        return thread
    }

    private func finish(_ result: Result<Value, VirtError>) {
        let waiter = state.withLock { state in
            state.result = result
            let waiter = state.waiter
            state.waiter = nil
            return waiter
        }
        waiter?.resume(returning: result)
    }

    /// The body's result, once it has returned.
    var value: Result<Value, VirtError> {
        get async {
            await withCheckedContinuation { continuation in
                let ready = state.withLock { state -> Result<Value, VirtError>? in
                    if let result = state.result { return result }
                    state.waiter = continuation
                    return nil
                }
                if let ready { continuation.resume(returning: ready) }
            }
        }
    }
}
