import CommandRunner
import Foundation
import VirtCore

/// console.log, where QEMU logs the serial console: kept bounded on the disk, and read only by
/// its ends.
///
/// What the guest writes to its serial console is not ours to limit (a test may write to
/// /dev/ttyS0 for hours), and QEMU's log file grows for as long as it does. QEMU writes at its
/// own offset, so the file cannot be shortened from its start: its oldest part is punched out
/// (a hole, which takes no space) once the file holds more than the limit, keeping the last half
/// of the limit. The file's size goes on growing; its blocks do not.
public struct ConsoleLog: Sendable {
    /// `--console-log-limit`'s default, in bytes.
    public static let defaultLimit = 16 << 20
    /// How often the file's size is looked at: the guest writes at most a few MiB a second to a
    /// serial port, so the file exceeds the limit by little before it is trimmed.
    static let interval: Duration = .milliseconds(250)

    let path: String
    /// Bytes the file may occupy on the disk.
    let limit: Int
    let runner: any CommandRunner

    /// `fallocate --punch-hole`: util-linux is essential in Debian, and the system call is not in
    /// Swift's view of the C library.
    static func punchHole(_ path: String, length: Int) -> Command {
        Command("fallocate", ["--punch-hole", "--offset", "0", "--length", String(length), "--", path])
    }

    /// Trims the file whenever it occupies more than the limit, until cancelled.
    func keepBounded() async {
        var warned = false
        var lastCut = 0
        while !Task.isCancelled {
            if let kept = await trim(after: &lastCut), !warned {
                warned = true
                log.warning(
                    "the guest wrote more than \(limit >> 20) MiB to its serial console: \(path) keeps the last "
                        + "\(kept >> 10) KiB of it")
            }
            try? await Task.sleep(for: Self.interval)
        }
    }

    /// Punches out all but the end of the file if it occupies more than the limit; returns how
    /// much of it is kept then, nil when nothing was done.
    ///
    /// `lastCut` is where the last trim cut: a file system that keeps blocks allocated past a
    /// hole (XFS preallocates) is punched again only once the guest wrote a quarter of the limit
    /// more, not at every look.
    func trim(after lastCut: inout Int) async -> Int? {
        var info = stat()
        guard stat(path, &info) == 0, Int(info.st_blocks) * 512 > limit else { return nil }
        let keep = max(limit / 2, 4096)
        // Whole blocks only: a partial one at the cut would be zeroed, not freed.
        let cut = (Int(info.st_size) - keep) & ~4095
        // A new file (a revert started QEMU on a fresh one) starts over.
        if cut < lastCut { lastCut = 0 }
        guard cut > 0, lastCut == 0 || cut >= lastCut + limit / 4 else { return nil }
        let result: CommandResult
        do throws(VirtError) {
            result = try await runner.run(
                Self.punchHole(path, length: cut), input: .none, output: .discard, error: .capture)
        } catch {
            // Cancelled (the instance is going away), or no fallocate: the log stays whole.
            log.debug("cannot punch a hole into \(path): \(error.message)")
            return nil
        }
        lastCut = cut
        guard result.status.succeeded else {
            guard result.errorText.contains("not supported") else {
                log.debug("cannot punch a hole into \(path): \(result.errorText)")
                return nil
            }
            // A file system without holes: empty the file. QEMU's next write at its offset leaves
            // the space before it unallocated, which is what a hole would have been.
            log.debug("\(path) is on a file system without holes: emptying it")
            guard truncate(path, 0) == 0 else { return nil }
            return 0
        }
        return Int(info.st_size) - cut
    }

    /// The last `characters` characters of the file, decoded leniently (a guest writes any
    /// bytes to its console), reading no more than four bytes for each.
    static func tail(of path: String, characters: Int) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { return "" }
        let size = Int(info.st_size)
        let count = min(size, characters * 4)
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes.withUnsafeMutableBytes {
                pread(fd, $0.baseAddress.map { $0 + done }, count - done, off_t(size - count + done))
            }
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { break }
            done += got
        }
        // A punched-out start reads as zeros: they are nothing the guest wrote.
        let text = String(decoding: bytes[0..<done].drop { $0 == 0 }, as: UTF8.self)
        return String(text.suffix(characters))
    }
}
