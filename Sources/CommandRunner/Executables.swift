import Foundation
import Subprocess

/// Finds executables the way ``SubprocessRunner`` runs them: swift-subprocess's lookup on PATH.
public enum Executables {
    /// The path of `name`, or nil when there is no such executable: a name with a slash is a
    /// path and must be executable there; any other name is looked for on PATH.
    public static func find(_ name: String) async -> String? {
        // swift-subprocess returns a path unchecked: it leaves that to the spawn.
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        return try? await Executable.name(name).resolveExecutablePath(in: .inherit).string
    }

    /// Whether ``find(_:)`` finds `name`.
    public static func exist(_ name: String) async -> Bool { await find(name) != nil }
}
