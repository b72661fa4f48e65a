import NIOCore
import NIOPosix
import VirtCore

/// A client of a guest's serial console on QEMU's unix-socket chardev: raw bytes both ways, as
/// a person at the terminal would type and read them.
///
/// It is used to log in and run one fixed command on an image that has no guest agent yet.
/// QEMU's chardev keeps logging the guest's output to its log file while we are connected.
/// Everything waits with a timeout and fails with a ``VirtError``; nothing here can hang.
public actor SerialConsole {
    /// The most output kept while waiting for a pattern (older output is dropped).
    static let maximumPending = 1 << 20

    /// How a login on the console went.
    public enum Login: Sendable, Equatable {
        /// A root shell answers.
        case root
        /// A shell answers, but not as root (uid given).
        case user(uid: String)
    }

    private let name: String
    private let chunks: Mailbox<[UInt8]>
    private let channel: any Channel
    /// Output received and not yet consumed by a match.
    private var pending: [UInt8] = []
    /// The output the last match skipped: what came before the pattern.
    private var skipped: [UInt8] = []

    private init(name: String, chunks: Mailbox<[UInt8]>, channel: any Channel) {
        self.name = name
        self.chunks = chunks
        self.channel = channel
    }

    deinit {
        channel.close(promise: nil)
    }

    /// Connects to the console socket at `path`, retrying while it does not accept yet.
    public static func connect(path: String, timeout: Duration) async throws(VirtError) -> SerialConsole {
        let name = "serial console \(path)"
        let (channel, chunks) = try await UnixConnector.connect(
            path: path, name: name, timeout: timeout, every: .milliseconds(100))
        return SerialConsole(name: name, chunks: chunks, channel: channel)
    }

    /// Types `text` (the caller adds the newlines).
    public func send(_ text: String) async throws(VirtError) {
        do {
            try await channel.writeAndFlush(ByteBuffer(bytes: Array(text.utf8))).get()
        } catch {
            throw VirtError(.testbedFailure, "\(name): cannot send: \(error)")
        }
    }

    /// Waits until the output not consumed yet contains one of `patterns` and returns the index of
    /// the one that occurs first (the lowest index among those starting at the same place); the
    /// output up to the end of the match is consumed. Throws a ``VirtError/Code/timeout`` error
    /// naming `what` after `timeout`, and a ``VirtError/Code/testbedFailure`` one if the
    /// console closes.
    public func expect(_ patterns: [String], _ what: String, timeout: Duration) async throws(VirtError) -> Int {
        try await withTimeout(timeout, "waiting for \(what) on the serial console") {
            try await self.readUntil(patterns.map { Array($0.utf8) })
        }
    }

    /// What the last ``expect(_:_:timeout:)`` skipped before its match.
    public var skippedText: String { String(decoding: skipped, as: UTF8.self) }

    private func readUntil(_ patterns: [[UInt8]]) async throws -> Int {
        while true {
            if let match = Self.firstMatch(patterns, in: pending) {
                skipped = Array(pending[0..<match.start])
                pending.removeFirst(match.end)
                return match.index
            }
            let chunk = try await chunks.next()
            pending += chunk
            if pending.count > Self.maximumPending { pending.removeFirst(pending.count - Self.maximumPending) }
        }
    }

    /// The pattern that occurs first in `bytes` and where its match ends.
    static func firstMatch(_ patterns: [[UInt8]], in bytes: [UInt8]) -> (index: Int, start: Int, end: Int)? {
        var best: (index: Int, start: Int, end: Int)?
        for (index, pattern) in patterns.enumerated() where !pattern.isEmpty && pattern.count <= bytes.count {
            var start = 0
            while start + pattern.count <= bytes.count {
                if bytes[start] == pattern[0] && bytes[start..<start + pattern.count].elementsEqual(pattern) { break }
                start += 1
            }
            guard start + pattern.count <= bytes.count else { continue }
            if best == nil || start < (best?.start ?? 0) { best = (index, start, start + pattern.count) }
        }
        return best
    }

    /// Logs in as root at a login prompt: types `root`, answers an empty password if asked,
    /// and checks that a shell answers and which user it runs as.
    ///
    /// Throws a ``VirtError/Code/testbedFailure`` error saying why not (a password is needed,
    /// no shell answered) or a ``VirtError/Code/timeout`` one.
    public func logInAsRoot(timeout: Duration) async throws(VirtError) -> Login {
        try await logIn(user: "root", password: nil, timeout: timeout)
    }

    /// Logs in as `user` at a login prompt: types the name, answers `password` (empty when nil)
    /// if asked, and checks that a shell answers and which user it runs as. Neither is ever
    /// given to a shell: login reads them.
    ///
    /// Throws a ``VirtError/Code/testbedFailure`` error saying why not (a password is needed,
    /// no shell answered) or a ``VirtError/Code/timeout`` one.
    public func logIn(user: String, password: String?, timeout: Duration) async throws(VirtError) -> Login {
        let deadline = Deadline(after: timeout)
        // The shell's prompts, and login's answers. A prompt is confirmed by the probe below.
        // Not "login: ": a successful login may print "Last login: ...".
        let answers = ["Password:", "Login incorrect", "# ", "$ "]
        try await send("\(user)\n")
        var answer = try await expect(answers, "an answer to the login", timeout: deadline.remaining())
        if answer == 0 {
            try await send("\(password ?? "")\n")
            answer = try await expect(answers, "an answer to the password", timeout: deadline.remaining())
            if answer < 2 {
                throw VirtError(
                    .testbedFailure,
                    password == nil
                        ? "\(user) cannot log in on the serial console without a password"
                        : "\(user) cannot log in on the serial console with the password given")
            }
        } else if answer == 1 {
            throw VirtError(.testbedFailure, "\(user) cannot log in on the serial console (login refused it)")
        }
        // Whatever the prompt looks like: a shell prints this (its echo does not contain it).
        try await send("unset HISTFILE; printf '%s-%s-%s\\n' debusine-virt shell \"$(id -u)\"\n")
        _ = try await expect(["debusine-virt-shell-"], "the shell to answer", timeout: deadline.remaining())
        _ = try await expect(["\n"], "the shell to answer", timeout: deadline.remaining())
        let uid = String(skippedText.filter { !$0.isWhitespace })
        return uid == "0" ? .root : .user(uid: uid)
    }

    /// The prompt `sudo -p` is given: sudo prints `%%` as `%`, so the terminal's echo of the
    /// command line (which has `%%`) never matches what sudo prints.
    static let sudoPromptArgument = "debusine-virt-sudo%%password:"
    static let sudoPrompt = "debusine-virt-sudo%password:"

    /// Runs `script` as root through sudo in the logged-in shell of another user, answering
    /// sudo's password prompt with `password` (empty when nil) if it asks, and returns the exit
    /// status. `script` must be a constant of the caller without newlines or single quotes; the
    /// password is typed at sudo's prompt, never into the shell. Throws a
    /// ``VirtError/Code/timeout`` error after `timeout`.
    public func runWithSudo(
        _ script: String, password: String?, _ what: String, timeout: Duration
    ) async throws(VirtError) -> Int32 {
        guard !script.contains("'"), !script.contains("\n") else {
            throw VirtError(.internalError, "\(what): the script cannot be quoted for sudo")
        }
        let deadline = Deadline(after: timeout)
        try await send(
            "sudo -p '\(Self.sudoPromptArgument)' sh -c '\(script)'; "
                + "printf '%s-%s-%s\\n' debusine-virt status \"$?\"\n")
        var answer = try await expect([Self.sudoPrompt, "debusine-virt-status-"], what, timeout: deadline.remaining())
        if answer == 0 {
            try await send("\(password ?? "")\n")
            answer = try await expect([Self.sudoPrompt, "debusine-virt-status-"], what, timeout: deadline.remaining())
            if answer == 0 {
                throw VirtError(.testbedFailure, "sudo did not take the password given, for \(what)")
            }
        }
        return try await readStatus(what, timeout: deadline.remaining())
    }

    /// Runs `script` in the logged-in shell and returns its exit status. `script` must be a
    /// constant command line of the caller (never user input) without newlines; its output goes
    /// to the console. Throws a ``VirtError/Code/timeout`` error after `timeout`.
    public func run(_ script: String, _ what: String, timeout: Duration) async throws(VirtError) -> Int32 {
        let deadline = Deadline(after: timeout)
        try await send("\(script); printf '%s-%s-%s\\n' debusine-virt status \"$?\"\n")
        _ = try await expect(["debusine-virt-status-"], what, timeout: deadline.remaining())
        return try await readStatus(what, timeout: deadline.remaining())
    }

    /// The status after a `debusine-virt-status-` marker that was just matched.
    private func readStatus(_ what: String, timeout: Duration) async throws(VirtError) -> Int32 {
        _ = try await expect(["\n"], what, timeout: timeout)
        let text = String(skippedText.filter { !$0.isWhitespace })
        guard let status = Int32(text) else {
            throw VirtError(
                .testbedFailure, "\(what): unexpected status \(text.debugDescription) on the serial console")
        }
        return status
    }

    /// Logs out (best effort) and closes the connection.
    public func logOut() async {
        try? await send("exit\n")
        _ = try? await expect(["login: "], "the login prompt after logging out", timeout: .seconds(10))
    }

    /// Closes the connection; QEMU keeps the console and its log. A plain close (see
    /// ``LineConnection/close()``): a guest that stopped reading its console holds our writes.
    public func close() async {
        chunks.finish(throwing: VirtError(.testbedFailure, "\(name): connection closed"))
        do {
            try await channel.close().get()
        } catch {
            // Already closed.
        }
    }
}
