import CommandRunner
import Foundation
import Synchronization
import VirtCore

/// A real HTTP server on 127.0.0.1 (Python's http.server, started by the test), serving the
/// files of ``files`` under paths that choose its behaviour:
/// - `/files/NAME`: the file;
/// - `/slow/NAME`: the file after one second, so a concurrent fetch surely finds the first running;
/// - `/half/NAME`: a Content-Length for the whole file, half of it, then the connection closes;
/// - `/redirect/NAME`: a 302 to `/files/NAME`;
/// - anything else, or a missing file: 404.
/// Every request path is appended to a log, which is how tests count downloads.
public final class TestHTTPServer: Sendable {
    public let root: String
    public let files: String
    public let port: Int
    private let process: ServerProcess

    static let script = #"""
        import http.server, os, sys, time
        files, log_path = sys.argv[1], sys.argv[2]

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with open(log_path, "a") as log:
                    log.write(self.path + "\n")
                parts = self.path.split("/")
                if len(parts) != 3 or parts[2].startswith("."):
                    return self.send_error(404)
                mode, name = parts[1], parts[2]
                path = os.path.join(files, name)
                if mode not in ("files", "slow", "half", "redirect") or not os.path.isfile(path):
                    return self.send_error(404)
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "/files/" + name)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with open(path, "rb") as source:
                    data = source.read()
                if mode == "slow":
                    time.sleep(1)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if mode == "half" else data)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        print(server.server_address[1], flush=True)
        server.serve_forever()
        """#

    /// Serves the whole tree under `directory` (left alone by ``stop()``) at `/`, as a plain
    /// static server: e.g. an apt repository for a guest.
    static let directoryScript = #"""
        import functools, http.server, sys
        directory, log_path = sys.argv[1], sys.argv[2]

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with open(log_path, "a") as log:
                    log.write(self.path + "\n")
                super().do_GET()

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=directory))
        print(server.server_address[1], flush=True)
        server.serve_forever()
        """#

    /// The server of ``files`` described above; with `directory`, a plain static server of
    /// that tree at `/` instead (see ``directoryScript``).
    public init(directory: String? = nil) async throws {
        root = try TestPaths.makeTemporaryDirectory("dv-http.")
        files = directory ?? "\(root)/files"
        if directory == nil {
            try FileManager.default.createDirectory(atPath: files, withIntermediateDirectories: false)
        }
        _ = FileManager.default.createFile(atPath: "\(root)/requests", contents: Data())
        process = try ServerProcess([
            "/usr/bin/env", "python3", "-c", directory == nil ? Self.script : Self.directoryScript, files,
            "\(root)/requests",
        ])
        let line = try await process.readLine(timeout: .seconds(30))
        guard let line, let port = Int(line) else {
            throw VirtError(.commandFailed, "the test HTTP server did not start: \(process.standardError)")
        }
        self.port = port
    }

    /// Creates a file to serve with `size` random bytes and returns its content.
    @discardableResult
    public func add(_ name: String, size: Int) throws -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<size).map { _ in UInt8.random(in: 0...255, using: &generator) }
        try Data(bytes).write(to: URL(fileURLWithPath: "\(files)/\(name)"))
        return bytes
    }

    /// Serves `bytes` as `name`.
    public func add(_ name: String, bytes: [UInt8]) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: "\(files)/\(name)"))
    }

    public func url(_ name: String, mode: String = "files") -> String { "http://127.0.0.1:\(port)/\(mode)/\(name)" }

    /// Every request path the server received, in order.
    public var requestedPaths: [String] {
        let log = (try? String(contentsOfFile: "\(root)/requests", encoding: .utf8)) ?? ""
        return log.split(separator: "\n").map(String.init)
    }

    /// How many requests for `/mode/name` the server received.
    public func requests(_ name: String, mode: String = "files") -> Int {
        let log = (try? String(contentsOfFile: "\(root)/requests", encoding: .utf8)) ?? ""
        return log.split(separator: "\n").filter { $0 == "/\(mode)/\(name)" }.count
    }

    public func stop() async {
        process.signal(SIGTERM)
        _ = try? await process.wait(timeout: .seconds(10))
        TestPaths.removeTree(root)
    }
}
