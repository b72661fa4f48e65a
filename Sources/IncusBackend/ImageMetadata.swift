/// Architecture names: Debian's, Incus's, and the ELF machine they come from.
public enum Architecture {
    /// Debian architecture -> Incus architecture.
    public static let incusNames: [String: String] = [
        "amd64": "x86_64", "arm64": "aarch64", "armel": "armv6l", "armhf": "armv7l", "i386": "i686",
        "ppc64el": "ppc64le", "riscv64": "riscv64", "s390x": "s390x", "loong64": "loongarch64",
        "mips64el": "mips64", "ppc64": "ppc64",
    ]

    public static func incusName(debian: String) -> String? { incusNames[debian] }

    /// The Debian architecture of an ELF executable, from its header.
    public static func debian(elfHeader bytes: [UInt8]) -> String? {
        guard bytes.count >= 52, bytes[0] == 0x7f, bytes[1] == 0x45, bytes[2] == 0x4c, bytes[3] == 0x46 else {
            return nil
        }
        let is64 = bytes[4] == 2
        let little = bytes[5] == 1
        let machine = little ? Int(bytes[18]) | Int(bytes[19]) << 8 : Int(bytes[18]) << 8 | Int(bytes[19])
        switch (machine, is64, little) {
        case (0x3E, true, true): return "amd64"
        case (0x03, false, true): return "i386"
        case (0xB7, true, true): return "arm64"
        case (0x28, false, true):
            // e_flags: EF_ARM_ABI_FLOAT_HARD tells armhf from armel.
            let flags = Int(bytes[36]) | Int(bytes[37]) << 8 | Int(bytes[38]) << 16 | Int(bytes[39]) << 24
            return flags & 0x400 != 0 ? "armhf" : "armel"
        case (0x15, true, true): return "ppc64el"
        case (0x15, true, false): return "ppc64"
        case (0x16, true, false): return "s390x"
        case (0xF3, true, true): return "riscv64"
        case (0x102, true, true): return "loong64"
        case (0x08, true, true): return "mips64el"
        default: return nil
        }
    }

    /// The Debian architecture of this host's `uname -m`.
    public static func debian(machine: String) -> String? {
        incusNames.first { $0.value == machine }?.key
    }
}

/// metadata.yaml and the templates of an imported image.
public struct ImageMetadata: Sendable, Equatable {
    public var debianArchitecture: String
    public var os: String
    public var release: String
    public var artifactID: String
    public var description: String
    public var creationDate: Int
    /// Containers get /etc/hostname and /etc/hosts from templates on create and copy.
    public var withTemplates: Bool

    public init(
        debianArchitecture: String, os: String, release: String, artifactID: String, description: String? = nil,
        creationDate: Int, withTemplates: Bool = true
    ) {
        self.debianArchitecture = debianArchitecture
        self.os = os
        self.release = release
        self.artifactID = artifactID
        self.description = description ?? "\(os) \(release) \(debianArchitecture) (debusine artifact \(artifactID))"
        self.creationDate = creationDate
        self.withTemplates = withTemplates
    }

    public static let hostnameTemplate = "{{ instance.name }}\n"
    public static let hostsTemplate = """
        127.0.1.1 {{ instance.name }}
        127.0.0.1 localhost
        ::1 localhost ip6-localhost ip6-loopback
        ff02::1 ip6-allnodes
        ff02::2 ip6-allrouters

        """

    /// The YAML text. Every string is double-quoted, so no value can change the structure.
    public func yaml(incusArchitecture: String) -> String {
        var text = """
            architecture: \(Self.quoted(incusArchitecture))
            creation_date: \(creationDate)
            profiles:
            - "debusine"
            properties:
              architecture: \(Self.quoted(debianArchitecture))
              artifact_id: \(Self.quoted(artifactID))
              description: \(Self.quoted(description))
              os: \(Self.quoted(os))
              release: \(Self.quoted(release))

            """
        if withTemplates {
            text += "templates:\n"
            for (path, template) in [("/etc/hostname", "hostname.tpl"), ("/etc/hosts", "hosts.tpl")] {
                text += """
                      \(path):
                        when:
                        - create
                        - copy
                        create_only: false
                        template: \(template)
                        properties: {}

                    """
            }
        }
        return text
    }

    /// A YAML double-quoted scalar.
    static func quoted(_ value: String) -> String {
        var out = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7f {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\x" + String(repeating: "0", count: 2 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    /// NAME=value lines of os-release, unquoted.
    public static func parseOSRelease(_ text: String) -> [String: String] {
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let equals = line.firstIndex(of: "="), !line.hasPrefix("#") else { continue }
            var value = line[line.index(after: equals)...]
            if value.count >= 2, let first = value.first, first == "\"" || first == "'", value.last == first {
                value = value.dropFirst().dropLast()
            }
            fields[String(line[..<equals])] = String(value)
        }
        return fields
    }
}
