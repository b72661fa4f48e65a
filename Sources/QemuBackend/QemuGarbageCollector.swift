import Foundation
import VirtCore

/// Removes what servers that died without cleaning up (SIGKILL, a crash, a power cut of the
/// worker's session) left behind: their QEMU processes and instance directories.
///
/// An instance directory names its server in `owner`; while that process lives, the instance is
/// not touched. QEMU is killed only when its pid file names a process whose command line
/// mentions the instance directory, so a reused pid is never hit.
public enum QemuGarbageCollector {
    /// Collects in `parent` (the servers' $TMPDIR); returns one line per instance removed.
    /// With `owner`, only that server's instances (the death watch's run, once it has died).
    public static func collect(parent: String, owner only: pid_t? = nil) -> [String] {
        var report: [String] = []
        let orphans = OwnedDirectory.orphans(in: parent, prefix: "dvq.", program: "debusine-virt-qemu", owner: only)
        for directory in orphans {
            let paths = InstancePaths(directory: directory)
            var line = "removed \(directory)"
            if let qemu = OwnedDirectory.readPID(paths.pidFile),
                OwnedDirectory.isAlive(qemu, commandContains: directory)
            {
                kill(qemu, SIGKILL)
                for _ in 0..<100 where OwnedDirectory.isAlive(qemu, commandContains: directory) { usleep(20_000) }
                line += " and killed its QEMU (pid \(qemu))"
            }
            if let overlay = recordedOverlayDirectory(paths) {
                do {
                    try FileManager.default.removeItem(atPath: overlay)
                    line += " and its overlay directory \(overlay)"
                } catch {
                    report.append("could not remove \(overlay): \(error)")
                    continue
                }
            }
            do {
                try FileManager.default.removeItem(atPath: directory)
            } catch {
                report.append("could not remove \(directory): \(error)")
                continue
            }
            report.append(line)
        }
        return report
    }

    /// The `--overlay-dir` directory an instance recorded, if it is still one this user made
    /// there: an absolute path to a directory of ours named like the ones servers make. Anything
    /// else in the record is left alone.
    static func recordedOverlayDirectory(_ paths: InstancePaths) -> String? {
        guard let text = try? String(contentsOfFile: paths.overlayRecord, encoding: .utf8) else { return nil }
        let path = text.trimmingCharacters(in: .newlines)
        let name = path.split(separator: "/").last.map(String.init) ?? ""
        guard path.hasPrefix("/"), !path.split(separator: "/").contains(".."),
            name.hasPrefix(InstancePaths.overlayDirectoryPrefix)
        else { return nil }
        var info = stat()
        guard lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == getuid() else { return nil }
        return path
    }
}
