import Glibc

/// The one error type of debusine-virt: a machine-readable code and a message for humans.
///
/// Every module throws this type. How a code becomes a process exit status is decided in
/// exactly one place, ``ExitStatus``.
public struct VirtError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Code: String, Sendable, Equatable {
        /// The command line was wrong.
        case usage
        /// The client broke the virt-server protocol (unknown verb, wrong state, EOF, ...).
        case protocolMisuse
        /// A backend, a host tool or a host feature is missing.
        case unavailable
        /// A file, image or instance does not exist.
        case notFound
        /// An image that must not be booted or imported: it reads other files of the host (a
        /// backing file, a data file), is in another format, or has nothing to boot.
        case badImage
        /// An external command failed.
        case commandFailed
        /// Something took longer than allowed.
        case timeout
        /// A copy between host and testbed failed.
        case copyFailed
        /// The testbed misbehaved: did not boot, died, lost its agent.
        case testbedFailure
        /// Reading or writing a local file, pipe or socket failed.
        case io
        /// A bug in debusine-virt.
        case internalError
    }

    public var code: Code
    /// The whole text for humans, with the system's reason when there is one.
    public var message: String
    /// The errno of the system call that failed, when one did: what a caller tests (ENOSPC,
    /// ENOENT) instead of the text. Part of equality: an error made with `errno:` equals only
    /// another made with the same errno.
    public var underlying: Int32?

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
        self.underlying = nil
    }

    /// An error from a failed system call: `message`, then the system's text for `errno`.
    public init(_ code: Code, _ message: String, errno number: Int32) {
        self.code = code
        self.message = "\(message): \(Self.text(errno: number))"
        self.underlying = number
    }

    /// The system's text for an errno value (strerror), for log lines; errors take `errno:`.
    public static func text(errno number: Int32) -> String { String(cString: strerror(number)) }

    public var description: String { message }
}

/// Maps errors to process exit statuses, in one place.
///
/// The protocol fixes two of them: 12 for any failure once the session loop runs
/// (autopkgtest's `bomb()`), 16 for an unexpected internal error.
public enum ExitStatus {
    /// A session failed: misuse, EOF on stdin, or a testbed failure.
    public static let sessionFailure: Int32 = 12
    /// An unexpected internal error during a session.
    public static let internalFailure: Int32 = 16

    /// The exit status for an error raised before the banner was written.
    public static func beforeBanner(_ error: VirtError) -> Int32 {
        switch error.code {
        case .usage: return 64  // EX_USAGE, as ArgumentParser uses for its own errors
        case .unavailable: return 69  // EX_UNAVAILABLE
        case .badImage: return 65  // EX_DATAERR: the input data, not the command line, is wrong
        default: return 1
        }
    }

    /// The exit status for an error that ends a running session.
    public static func inSession(_ error: VirtError) -> Int32 {
        error.code == .internalError ? internalFailure : sessionFailure
    }
}
