import CommandRunner
import VirtCore

/// The default `shell`: `bash -i` through the auxverb, wired to the caller's terminal.
public enum InteractiveShell {
    /// cd to $1, export the remaining `VAR=value` words, then an interactive bash.
    public static let script =
        #"cd -- "$1" || exit 1; shift; for assignment do export "$assignment"; done; exec bash -i"#

    public static func run(_ testbed: InTestbed, directory: String, environment: [String]) async throws(VirtError) {
        var assignments = environment
        if let term = getenv("TERM") { assignments.append("TERM=\(String(cString: term))") }
        let tty = open("/dev/tty", O_RDWR | O_CLOEXEC)
        guard tty >= 0 else {
            // Upstream logs and still answers ok: a missing terminal is not a protocol error.
            log.error("cannot run a shell: /dev/tty: \(VirtError.text(errno: errno))")
            return
        }
        defer { close(tty) }
        let result = try await testbed.run(
            ["sh", "-c", script, "sh", directory] + assignments,
            input: .fileDescriptor(tty, closeAfterStart: false),
            output: .fileDescriptor(tty, closeAfterStart: false),
            error: .fileDescriptor(tty, closeAfterStart: false))
        log.debug("shell ended with \(result.status)")
    }
}
