import Foundation
import Synchronization
import VirtCore

/// `--show-boot`: copies what the guest writes on its serial console to stderr while it boots,
/// as autopkgtest-virt-qemu's option does.
///
/// It follows console.log, which QEMU writes, rather than the console socket: QEMU serves one
/// client per socket, and installing the guest agent over the console needs that one. A file
/// replaced meanwhile (a revert clears the instance directory) is followed from its start.
final class ConsoleEcho: Sendable {
    private let stopped = Mutex(false)
    private let path: String

    /// Starts following `path`. Output already in the file (the boot before a reboot) is not
    /// repeated.
    static func start(path: String) -> ConsoleEcho {
        let echo = ConsoleEcho(path: path)
        let thread = Thread { echo.follow() }
        thread.start()
        return echo
    }

    private init(path: String) {
        self.path = path
    }

    /// Ends the copying, once what is in the file now is written.
    func stop() {
        stopped.withLock { $0 = true }
    }

    /// A plain thread, not a task: it sleeps between polls, and must not hold up the tasks the
    /// boot runs on.
    private func follow() {
        var fd: Int32 = -1
        var inode: ino_t = 0
        var offset: off_t = 0
        var info = stat()
        if stat(path, &info) == 0 {
            inode = info.st_ino
            offset = info.st_size
        }
        defer { if fd >= 0 { close(fd) } }
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let last = stopped.withLock { $0 }
            if stat(path, &info) == 0 {
                if info.st_ino != inode || info.st_size < offset {
                    // A new file (a new boot after a revert): from its start.
                    if fd >= 0 { close(fd) }
                    fd = -1
                    inode = info.st_ino
                    offset = 0
                }
                if fd < 0 { fd = open(path, O_RDONLY | O_CLOEXEC) }
                while fd >= 0 {
                    let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }
                    guard count > 0 else { break }
                    offset += off_t(count)
                    Log.writeToStandardError(buffer[0..<count])
                }
            }
            if last { return }
            usleep(100_000)
        }
    }
}
