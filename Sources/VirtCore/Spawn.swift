import Glibc

/// One `posix_spawn` for every child this project starts by hand (a server under test, the
/// death watch, the tests' long-running children): with ``SpawnHygiene``'s rules applied every
/// time, so no caller can forget one.
///
/// The child gets only the descriptors `actions` give it on 0, 1 and 2 (every other one is
/// closed), every signal at its default action and none blocked.
public enum Spawn {
    /// A descriptor set-up in the child, before it runs the program.
    public enum Action: Sendable {
        /// `dup2(from, onto)`: the child's `onto` is our `from`.
        case duplicate(Int32, onto: Int32)
        /// The child's `descriptor` is `path` opened with `flags` (and `mode` when it creates it).
        case open(Int32, path: String, flags: Int32, mode: mode_t = 0)
    }

    /// Starts `argv` and returns its pid.
    ///
    /// - Parameters:
    ///   - searchPath: argv[0] is looked up in PATH when it has no slash (`posix_spawnp`);
    ///     otherwise it must be a path.
    ///   - environment: `NAME=value` strings; nil passes this process's own.
    ///   - workingDirectory: where the child starts; nil for ours.
    ///   - newSession: the child leads a session of its own (`setsid`), which survives a kill of
    ///     our process group.
    ///   - newProcessGroup: the child leads a process group of its own in our session, so a
    ///     signal to our group (^C at a terminal) does not reach it: we pass signals on ourselves.
    public static func start(
        _ argv: [String], actions: [Action], environment: [String]? = nil, workingDirectory: String? = nil,
        searchPath: Bool = false, newSession: Bool = false, newProcessGroup: Bool = false
    ) throws(VirtError) -> pid_t {
        guard let program = argv.first else { throw VirtError(.internalError, "nothing to start: an empty argv") }
        var fileActions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fileActions)
        defer { posix_spawn_file_actions_destroy(&fileActions) }
        for action in actions {
            switch action {
            case .duplicate(let from, let onto): posix_spawn_file_actions_adddup2(&fileActions, from, onto)
            case .open(let descriptor, let path, let flags, let mode):
                posix_spawn_file_actions_addopen(&fileActions, descriptor, path, flags, mode)
            }
        }
        SpawnHygiene.closeStrayDescriptors(&fileActions)
        if let workingDirectory, !SpawnHygiene.changeDirectory(&fileActions, to: workingDirectory) {
            throw VirtError(.internalError, "cannot start \(program) in \(workingDirectory)")
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        SpawnHygiene.resetSignals(&attributes)
        // Added to the flags resetSignals set, not in place of them.
        var extraFlags: Int16 = 0
        // POSIX_SPAWN_SETSID (glibc 2.26) is only declared with _GNU_SOURCE.
        if newSession { extraFlags |= 0x80 }
        if newProcessGroup {
            posix_spawnattr_setpgroup(&attributes, 0)
            extraFlags |= Int16(POSIX_SPAWN_SETPGROUP)
        }
        if extraFlags != 0 {
            var flags: Int16 = 0
            posix_spawnattr_getflags(&attributes, &flags)
            guard posix_spawnattr_setflags(&attributes, flags | extraFlags) == 0 else {
                throw VirtError(.unavailable, "cannot start \(program) in a session or process group of its own")
            }
        }

        var child: pid_t = 0
        let spawn = searchPath ? posix_spawnp : posix_spawn
        let status = withCStrings(argv) { cArguments in
            guard let environment else {
                return spawn(&child, program, &fileActions, &attributes, cArguments, environ)
            }
            return withCStrings(environment) { cEnvironment in
                spawn(&child, program, &fileActions, &attributes, cArguments, cEnvironment)
            }
        }
        guard status == 0 else { throw VirtError(.commandFailed, "cannot start \(program)", errno: status) }
        return child
    }

    /// `body` with `strings` as a NULL-terminated array of C strings.
    private static func withCStrings(
        _ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> Int32
    ) -> Int32 {
        var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
        pointers.append(nil)
        defer { for pointer in pointers { free(pointer) } }
        return pointers.withUnsafeBufferPointer { buffer in
            guard let base = buffer.baseAddress else { return EINVAL }
            return body(base)
        }
    }
}
