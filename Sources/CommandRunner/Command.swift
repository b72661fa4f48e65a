/// An external command as a value: the argv to execute and how to execute it.
///
/// Commands are built by small functions (`qemu-img create ...`, `incus launch ...`) so unit tests
/// can assert the exact argv without running anything. Nothing here ever goes through a shell.
public struct Command: Sendable, Equatable, CustomStringConvertible {
    /// A program name looked up on PATH, or a path if it contains a `/`.
    public var executable: String
    public var arguments: [String]
    /// Variables to set (a value) or remove (`nil`) on top of the inherited environment.
    public var environment: [String: String?]
    public var workingDirectory: String?
    /// Start the command in a new session (and process group), so a terminal's signals do not
    /// reach it and it can be stopped as a group.
    public var newSession: Bool

    public init(
        _ executable: String,
        _ arguments: [String] = [],
        environment: [String: String?] = [:],
        workingDirectory: String? = nil,
        newSession: Bool = false
    ) {
        self.executable = executable
        self.arguments = arguments
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.newSession = newSession
    }

    /// Builds a command from a full argv (first element is the executable).
    public init(argv: [String]) {
        self.init(argv.first ?? "", Array(argv.dropFirst()))
    }

    /// The argv as it will be executed.
    public var argv: [String] { [executable] + arguments }

    /// The argv quoted for a human to read in logs; never executed.
    public var description: String { argv.map(Command.quoteForDisplay).joined(separator: " ") }

    static func quoteForDisplay(_ word: String) -> String {
        let plain = word.allSatisfy { $0.isLetter || $0.isNumber || "-_./=:,+@%".contains($0) }
        if plain && !word.isEmpty { return word }
        return "'" + word.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
}

extension String {
    fileprivate func replacingOccurrences(of target: String, with replacement: String) -> String {
        split(separator: target, omittingEmptySubsequences: false).joined(separator: replacement)
    }
}
