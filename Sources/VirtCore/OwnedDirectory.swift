import Glibc

/// The private directories servers make in $TMPDIR, each naming its server in an `owner` file
/// (its pid and start time), so that what a killed server left can be told from what a live one
/// still uses: its death watch and `gc` remove a directory once the process it names is gone.
public enum OwnedDirectory {
    /// The file in each directory that names its server.
    public static let ownerFileName = "owner"
    /// Directories younger than this (in seconds) without an owner file may still be in creation.
    public static let creationGrace = 60

    /// Writes the owner file of `directory`, naming this process: its pid, and on a second line
    /// its start time (so that a recycled pid is not taken for it).
    public static func claim(_ directory: String) throws(VirtError) {
        let path = "\(directory)/\(ownerFileName)"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw VirtError(.io, "cannot write \(path)", errno: errno) }
        defer { close(fd) }
        let pid = getpid()
        let text = Array("\(pid)\n\(LiveProcess.startTime(of: pid) ?? "")\n".utf8)
        let written = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == text.count else { throw VirtError(.io, "cannot write \(path)", errno: errno) }
    }

    /// The directories `parent/PREFIX*` of this user whose server has ended: the process their
    /// owner file names is gone (or is another under a recycled pid: another start time, or,
    /// for owner files without one, not a `program`), or, without an owner file, made more than
    /// ``creationGrace`` ago. With `owner`, only that server's.
    public static func orphans(
        in parent: String, prefix: String, program: String, owner only: pid_t? = nil
    )
        -> [String]
    {
        var found: [String] = []
        for name in (DirectoryEntries.names(in: parent) ?? []).sorted() where name.hasPrefix(prefix) {
            let directory = "\(parent)/\(name)"
            var info = stat()
            guard lstat(directory, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == getuid() else {
                continue
            }
            let owner = self.owner(of: directory)
            if let only, owner?.pid != only { continue }
            if let owner {
                if let startTime = owner.startTime {
                    // A process /proc hides (hidepid) is another user's, not the server that
                    // made this directory of ours.
                    if LiveProcess.isProcess(owner.pid, startedAt: startTime, unreadable: .ownerIfOurs) { continue }
                } else if isAlive(owner.pid, commandContains: program) {
                    // An owner file without a start time (older servers): the pid runs `program`.
                    continue
                }
            } else if Int(time(nil)) - Int(info.st_mtim.tv_sec) < creationGrace {
                continue
            }
            found.append(directory)
        }
        return found
    }

    /// The server that `directory`'s owner file names: its pid, and its start time unless the
    /// file has none (an older server's, which wrote only the pid, or a server that could not
    /// read its own start time). Nil without a readable owner file.
    public static func owner(of directory: String) -> (pid: pid_t, startTime: String?)? {
        let lines = (SmallFile.text("\(directory)/\(ownerFileName)", limit: 4096) ?? "").split(separator: "\n")
        guard let pid = lines.first.flatMap({ pid(in: $0) }) else { return nil }
        return (pid, lines.count > 1 ? String(lines[1]) : nil)
    }

    /// The pid a file holds on its first line.
    public static func readPID(_ path: String) -> pid_t? {
        SmallFile.firstLine(path).flatMap { pid(in: $0) }
    }

    private static func pid(in line: some StringProtocol) -> pid_t? {
        pid_t(String(line.filter { !$0.isWhitespace }))
    }

    /// Whether `pid` runs and its command line contains `needle` (zombies count as gone).
    public static func isAlive(_ pid: pid_t, commandContains needle: String) -> Bool {
        guard LiveProcess.isRunning(pid), let command = SmallFile.text("/proc/\(pid)/cmdline", limit: 1 << 16) else {
            return false
        }
        return command.split(separator: "\0").contains { $0.contains(needle) }
    }
}
