import VirtCore

/// Who launched an instance: the labels `open` puts on it and `gc` reads back.
///
/// A process is identified by host name and machine id (containers and cloned hosts share host
/// names, and workers on one remote may be such), pid and the pid's start time (so a recycled
/// pid is not mistaken for a live owner).
public struct InstanceOwner: Sendable, Equatable {
    /// What every label's key starts with.
    public static let labelPrefix = "user.debusine-virt."
    public static let hostKey = "user.debusine-virt.host"
    public static let pidKey = "user.debusine-virt.pid"
    public static let startKey = "user.debusine-virt.pid-start"
    public static let launchedKey = "user.debusine-virt.launched"
    public static let machineKey = "user.debusine-virt.machine-id"

    public var host: String
    /// /etc/machine-id; empty when the host has none (or the instance predates the label).
    public var machineID: String
    public var pid: Int32
    /// Field 22 of /proc/PID/stat: clock ticks after the host's boot.
    public var startTime: String

    public init(host: String, machineID: String = "", pid: Int32, startTime: String) {
        self.host = host
        self.machineID = machineID
        self.pid = pid
        self.startTime = startTime
    }

    /// This process.
    public static func current() -> InstanceOwner {
        let pid = getpid()
        return InstanceOwner(
            host: hostName(), machineID: machineID(), pid: pid, startTime: LiveProcess.startTime(of: pid) ?? "")
    }

    /// The labels, as `incus launch --config` pairs.
    public func labels(launched: Int = Int(time(nil))) -> [(key: String, value: String)] {
        [
            (Self.hostKey, host), (Self.machineKey, machineID), (Self.pidKey, String(pid)),
            (Self.startKey, startTime), (Self.launchedKey, String(launched)),
        ]
    }

    /// Reads the labels back from an instance's configuration; nil when it is not ours.
    public init?(configuration: [String: String]) {
        guard let host = configuration[Self.hostKey], let pidText = configuration[Self.pidKey],
            let pid = Int32(pidText), let start = configuration[Self.startKey]
        else { return nil }
        self.init(host: host, machineID: configuration[Self.machineKey] ?? "", pid: pid, startTime: start)
    }

    /// Whether this owner ran on the machine `other` describes: the same host name, and the same
    /// machine id when both know theirs.
    public func isOnSameMachine(as other: InstanceOwner) -> Bool {
        host == other.host && (machineID.isEmpty || other.machineID.isEmpty || machineID == other.machineID)
    }

    /// Whether the owning process still runs. Only answerable on the owner's own machine.
    ///
    /// When /proc does not show the pid (mounted with hidepid, another user's process), the
    /// kernel still says whether it exists: EPERM from `kill(pid, 0)` is a live process that
    /// is not ours to signal, and counts as the owner, as its start time cannot be read. A
    /// zombie has ended.
    public var isAlive: Bool {
        LiveProcess.isProcess(pid, startedAt: startTime, unreadable: .owner)
    }

    /// This machine's id (/etc/machine-id, else D-Bus's copy), or "" without one.
    public static func machineID() -> String {
        for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
            let text = String((SmallFile.text(path, limit: 4096) ?? "").filter { !$0.isWhitespace })
            if text.count == 32 && text.allSatisfy(\.isHexDigit) { return text }
        }
        return ""
    }

    public static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        return String(nulTerminated: buffer)
    }
}

/// Instance names: valid for Incus (a letter first, then letters, digits and hyphens, at most
/// 63 characters) and unique enough that two servers never pick the same one.
public enum InstanceName {
    public static let prefix = "debusine-virt-"

    /// `debusine-virt-` and 12 random lower-case letters and digits.
    public static func make() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789")
        var generator = SystemRandomNumberGenerator()
        let suffix = (0..<12).map { _ in alphabet[Int(generator.next(upperBound: UInt(alphabet.count)))] }
        return prefix + String(suffix)
    }

    /// Whether Incus accepts `name` as an instance name.
    public static func isValid(_ name: String) -> Bool {
        guard let first = name.first, first.isASCII, first.isLetter, name.count <= 63, name.last != "-" else {
            return false
        }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
    }
}
