/// QEMU's QAPI types that the servers send and read over QMP, with the members they use.
///
/// Decoding ignores the members left out, so these keep working as QEMU adds more.
public enum QMP {
    /// The reply of `query-status`.
    public struct StatusInfo: Decodable, Sendable, Equatable {
        /// "running", "paused", "inmigrate", "postmigrate", "prelaunch", ...
        public let status: String
        public let running: Bool
    }

    /// The reply of `query-migrate`; every member is absent before the first migration.
    public struct MigrationInfo: Decodable, Sendable, Equatable {
        /// "setup", "active", "completed", "failed", "cancelled", ...
        public let status: String?
        public let errorDescription: String?

        enum CodingKeys: String, CodingKey {
            case status
            case errorDescription = "error-desc"
        }
    }

    /// An element of the reply of `qom-list`.
    public struct ObjectProperty: Decodable, Sendable, Equatable {
        public let name: String
        public let type: String
    }

    /// The data of a VSERPORT_CHANGE event: a virtio-serial port opened or closed in the guest.
    public struct SerialPortChange: Decodable, Sendable, Equatable {
        /// The port's device id.
        public let id: String
        public let open: Bool

        public init(id: String, open: Bool) {
            self.id = id
            self.open = open
        }
    }

    /// The arguments of `migrate` and `migrate-incoming`.
    public struct MigrationTarget: Encodable, Sendable {
        public let uri: String

        public init(uri: String) { self.uri = uri }
    }

    /// The arguments of `qom-list`.
    public struct ObjectPath: Encodable, Sendable {
        public let path: String

        public init(path: String) { self.path = path }
    }

    /// The arguments of `device_del`.
    public struct DeviceID: Encodable, Sendable {
        public let id: String

        public init(id: String) { self.id = id }
    }

    /// The arguments of `migrate-set-capabilities`.
    public struct MigrationCapabilities: Encodable, Sendable {
        public struct Capability: Encodable, Sendable {
            public let capability: String
            public let state: Bool
        }

        public let capabilities: [Capability]

        /// x-ignore-shared: RAM in a shared file mapping stays out of the migration stream, as
        /// the destination maps the same file (a copy of it, here) itself.
        public static let ignoreShared = MigrationCapabilities(
            capabilities: [Capability(capability: "x-ignore-shared", state: true)])
    }
}
