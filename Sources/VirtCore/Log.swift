import Glibc
import Synchronization

/// Diagnostics on stderr, one line per call, never on stdout (stdout belongs to the protocol).
///
/// Lines go straight to file descriptor 2 with `write(2)`, so nothing sits in a buffer when the
/// process dies by a signal.
public final class Log: Sendable {
    /// How much to say.
    public enum Level: Int, Sendable, Comparable {
        case debug, info, warning, error

        public static func < (lhs: Level, rhs: Level) -> Bool { lhs.rawValue < rhs.rawValue }
    }

    private struct Settings {
        var program = "debusine-virt"
        var minimum = Level.info
    }

    private let settings = Mutex(Settings())

    /// The process-wide log.
    public static let shared = Log()

    public init() {}

    /// Sets the program name that prefixes each line and the lowest level written.
    public func configure(program: String, debug: Bool) {
        settings.withLock {
            $0.program = program
            $0.minimum = debug ? .debug : .info
        }
    }

    public var program: String { settings.withLock { $0.program } }

    public var isDebugEnabled: Bool { settings.withLock { $0.minimum == .debug } }

    public func debug(_ message: @autoclosure () -> String) { emit(.debug, message) }
    public func info(_ message: @autoclosure () -> String) { emit(.info, message) }
    public func warning(_ message: @autoclosure () -> String) { emit(.warning, message) }
    public func error(_ message: @autoclosure () -> String) { emit(.error, message) }

    private func emit(_ level: Level, _ message: () -> String) {
        let (program, minimum) = settings.withLock { ($0.program, $0.minimum) }
        guard level >= minimum else { return }
        let prefix: String
        switch level {
        case .debug: prefix = "debug: "
        case .info: prefix = ""
        case .warning: prefix = "warning: "
        case .error: prefix = "error: "
        }
        Log.writeToStandardError("\(program): \(prefix)\(message())\n")
    }

    /// Writes text to fd 2, retrying on interruption and partial writes; errors are dropped
    /// because there is nowhere left to report them.
    public static func writeToStandardError(_ text: String) {
        writeToStandardError(Array(text.utf8)[...])
    }

    /// Writes bytes, which need not be UTF-8 (a guest's console), to fd 2 the same way.
    public static func writeToStandardError(_ bytes: ArraySlice<UInt8>) {
        var rest = bytes
        while !rest.isEmpty {
            let written = rest.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            if written < 0 {
                if errno == EINTR { continue }
                return
            }
            rest = rest.dropFirst(written)
        }
    }
}

/// The process-wide log, for brevity at call sites.
public let log = Log.shared
