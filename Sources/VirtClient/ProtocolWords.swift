import VirtCore
import VirtProtocol

/// The client side of the protocol's words, as autopkgtest reads them.
public enum ProtocolWords {
    /// The auxverb argv of a `print-execute-command` reply: the first word after `ok`, split on
    /// commas, each element percent-decoded.
    public static func auxverb(fromReply reply: String) throws -> [String] {
        let words = reply.split(separator: " ")
        guard words.first == "ok", let word = words.dropFirst().first else {
            throw VirtError(.protocolMisuse, "not a print-execute-command reply: \(reply)")
        }
        return word.split(separator: ",").map { PercentCoding.decode(Array($0.utf8)) }
    }
}

extension ServerProcess {
    /// Sends one request line and returns the reply line; no reply (the server exited) is an
    /// error that carries the server's stderr.
    public func request(_ line: String, timeout: Duration = .seconds(600)) async throws -> String {
        _ = write(line: line)
        guard let reply = try await readLine(timeout: timeout) else {
            throw VirtError(.protocolMisuse, "no reply to \(line):\n\(standardError)")
        }
        return reply
    }
}
