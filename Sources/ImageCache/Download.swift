import CommandRunner
import VirtCore

/// The external commands of the cache: curl to download, openssl or sha256sum to verify.
enum CacheCommands {
    /// Downloads `url` into the existing file `output`.
    ///
    /// - `--disable` first: a user's ~/.curlrc must not change what the server fetches.
    /// - `--proto`, `--proto-redir`: only http(s) and file URLs, and a redirect may never lead to a
    ///   local file.
    /// - The timeouts end a stalled download with an error rather than a server that hangs
    ///   before its banner forever.
    /// - `--write-out %{http_code}` prints the status on curl's stdout (captured; never ours), so a
    ///   404 is told apart from other failures without parsing messages.
    /// - `--progress-bar` replaces `--silent` only when a person watches stderr.
    static func download(_ url: String, to output: String, progress: Bool) -> Command {
        var arguments = [
            "--disable", "--fail", "--location", "--proto", "=http,https,file", "--proto-redir", "=http,https",
            "--connect-timeout", "60", "--speed-limit", "1", "--speed-time", "120",
        ]
        arguments += progress ? ["--progress-bar"] : ["--silent"]
        arguments += ["--show-error", "--write-out", "%{http_code}", "--output", output, "--", url]
        return Command("curl", arguments)
    }

    /// Hashes its stdin: the file is given as a descriptor, so no path needs quoting or escaping
    /// in its output. OpenSSL uses the CPU's SHA instructions where it has them: 2 GiB took 1.9 s
    /// with it, 10.7 s with coreutils' sha256sum (which hashes too when openssl is not installed:
    /// Debian does not always have it).
    static let openssl = Command("openssl", ["dgst", "-sha256", "-r"])
    static let sha256sum = Command("sha256sum", ["--binary"])

    /// The SHA-256 of the file open on `fd` (read from its start), as lowercase hexadecimal.
    ///
    /// A sparse file (a saved state's RAM file) reaches the hasher through ``SparseFeed``, which
    /// reads only the parts that hold data; the digest is the same.
    static func sha256(of fd: Int32, path: String, runner: any CommandRunner) async throws(VirtError) -> String {
        guard lseek(fd, 0, SEEK_SET) == 0 else {
            throw VirtError(.io, "cannot read \(path)", errno: errno)
        }
        let feed = try SparseFeed.start(fd, path: path)
        let hasher = await Executables.exist(openssl.executable) ? openssl : sha256sum
        let result: CommandResult
        do throws(VirtError) {
            // The pipe's read end is closed here, whatever the runner did: a feed whose reader
            // never started must get EPIPE, not block for ever on a full pipe.
            defer { if let feed { close(feed.readEnd) } }
            result = try await runner.run(
                hasher, input: .fileDescriptor(feed?.readEnd ?? fd, closeAfterStart: false), output: .capture,
                error: .capture)
        } catch {
            guard await Executables.exist(hasher.executable) else {
                throw VirtError(.unavailable, "sha256sum is needed to check images: apt-get install coreutils")
            }
            throw error
        }
        guard result.status.succeeded else { throw VirtError.failed(hasher, result) }
        // The hasher saw the end of its input: the feed ended, and said so first. A feed that
        // stopped early would have hashed part of the file.
        if let feed, let failure = await feed.outcome() { throw failure }
        // Both print the digest first ("HEX *stdin", "HEX *-").
        let digest = String(result.outputText.prefix(64))
        guard ImageCache.isDigest(digest) else {
            throw VirtError(.commandFailed, "`\(hasher)` printed no digest for \(path): \(result.outputText)")
        }
        return digest
    }

    /// The error for a curl that did not succeed: one line naming the URL and the cause.
    static func downloadError(
        url: String, directory: String, result: CommandResult
    ) -> VirtError {
        let httpCode = Int(result.outputText.trimmed(" \n")) ?? 0
        let exitCode: Int32
        switch result.status {
        case .exited(let code): exitCode = code
        case .signaled(let signal):
            return VirtError(.commandFailed, "cannot download \(url): curl was killed by signal \(signal)")
        }
        // curl's own message, without its "curl: (N) " prefix; empty when it went to a terminal.
        let said =
            result.errorText.split(separator: "\n").last.map { line -> String in
                var text = Substring(line)
                if text.hasPrefix("curl: ("), let end = text.firstIndex(of: ")") {
                    text = text[text.index(after: end)...].drop { $0 == " " }
                }
                return String(text)
            } ?? ""
        func because(_ fallback: String) -> String { said.isEmpty ? fallback : said }
        switch exitCode {
        case 22 where httpCode == 404 || httpCode == 410:
            return VirtError(.notFound, "cannot download \(url): HTTP \(httpCode) (not found)")
        case 22:
            return VirtError(.commandFailed, "cannot download \(url): HTTP \(httpCode)")
        case 37:
            return VirtError(.notFound, "cannot download \(url): \(because("the file cannot be read"))")
        case 1, 3:
            return VirtError(.usage, "cannot download \(url): \(because("unsupported or malformed URL"))")
        case 23:
            if let free = CacheFiles.availableBytes(directory), free < 1 << 20 {
                return VirtError(.io, "cannot download \(url): the disk holding \(directory) is full")
            }
            return VirtError(.io, "cannot download \(url) into \(directory): \(because("write error"))")
        case 6:
            return VirtError(.commandFailed, "cannot download \(url): \(because("unknown host"))")
        case 7:
            return VirtError(.commandFailed, "cannot download \(url): \(because("connection refused"))")
        case 18:
            return VirtError(.commandFailed, "cannot download \(url): \(because("the transfer ended half way"))")
        case 28:
            return VirtError(.timeout, "cannot download \(url): \(because("timed out"))")
        default:
            return VirtError(.commandFailed, "cannot download \(url): \(because("curl exit status \(exitCode)"))")
        }
    }
}

extension String {
    fileprivate func trimmed(_ characters: String) -> String {
        String(drop { characters.contains($0) }.reversed().drop { characters.contains($0) }.reversed())
    }
}
