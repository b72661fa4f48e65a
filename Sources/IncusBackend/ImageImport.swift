import CommandRunner
import Foundation
import ImageCache
import TarFormat
import VirtCore

/// `debusine-virt-incus import`: makes a debusine system tarball (containers) or system image
/// (VMs) into an Incus image under the alias `artifact/ID`.
public struct ImageImport: Sendable {
    public struct Options: Sendable {
        public var artifactID: String
        public var virtualMachine = false
        /// Debian architecture; found from the image's executables when nil (containers), or
        /// the host's (VMs).
        public var architecture: String?
        public var description: String?
        /// The digest a downloaded file must have.
        public var sha256: String?
        /// The image cache for URLs (default: the QEMU backend's per-user cache).
        public var cacheDirectory: String?
        public var cli = IncusCLI()
        /// Where the work files go (they can be as large as the unpacked image).
        public var workParent = PrivateDirectory.temporaryParent

        public init(artifactID: String) { self.artifactID = artifactID }

        public var alias: String { "artifact/\(artifactID)" }
    }

    public let options: Options
    let runner: any CommandRunner

    public init(options: Options, runner: any CommandRunner = SubprocessRunner()) {
        self.options = options
        self.runner = runner
    }

    var cli: IncusCLI { options.cli }

    /// Imports `source` (a path, or a URL fetched through the image cache) and returns what
    /// happened, for the user.
    public func run(_ source: String) async throws(VirtError) -> String {
        guard options.artifactID.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }),
            !options.artifactID.isEmpty
        else {
            throw VirtError(
                .usage, "--artifact-id must be letters, digits, `-', `_' or `.' (got \(options.artifactID))")
        }
        if try await exists() {
            return "\(cli.qualified(options.alias)) is already imported; nothing to do"
        }
        let path: String
        if ImageCache.isURL(source) {
            // A VM's qcow2 is inspected as it is downloaded: a refused one is never cached.
            let runner = self.runner
            let check: ImageCheck? =
                options.virtualMachine
                ? { @Sendable path async throws(VirtError) in
                    try await Self.checkDisk(path, name: source, runner: runner)
                }
                : nil
            path = try await ImageCache(directory: options.cacheDirectory, runner: runner).fetch(
                source, sha256: options.sha256, check: check)
        } else {
            guard options.sha256 == nil else {
                throw VirtError(.usage, "--sha256 verifies downloads: give a URL, or check \(source) yourself")
            }
            path = source
        }
        guard access(path, R_OK) == 0 else {
            throw VirtError(.notFound, "\(path) does not exist or is not readable")
        }
        let work = try PrivateDirectory.make(in: options.workParent, prefix: "dvi-import.")
        defer { try? FileManager.default.removeItem(atPath: work) }
        let files =
            options.virtualMachine
            ? try await prepareVirtualMachine(path, work: work) : try await prepareContainer(path, work: work)
        let command = cli.imageImport(files, alias: options.alias)
        log.info("importing \(path) as \(cli.qualified(options.alias))")
        let result = try await runner.run(command)
        if !result.status.succeeded {
            if result.errorText.contains("already exists"), try await exists() {
                return "\(cli.qualified(options.alias)) was imported meanwhile by someone else; nothing to do"
            }
            throw IncusErrors.describe(command, result)
        }
        guard try await exists() else {
            throw VirtError(.commandFailed, "`\(command)` succeeded but \(cli.qualified(options.alias)) is not there")
        }
        return "imported \(path) as \(cli.qualified(options.alias))"
    }

    func exists() async throws(VirtError) -> Bool {
        let command = cli.imageInfo(options.alias)
        let result = try await runner.run(command)
        if result.status.succeeded { return true }
        if result.errorText.contains("not found") { return false }
        throw IncusErrors.describe(command, result)
    }

    // MARK: - Containers

    /// Units whose presence decides what the import adds.
    static let initPaths = ["sbin/init", "usr/sbin/init"]
    static let networkdUnits = [
        "lib/systemd/system/systemd-networkd.service", "usr/lib/systemd/system/systemd-networkd.service",
    ]
    static let waitOnlineUnits = [
        "lib/systemd/system/systemd-networkd-wait-online.service",
        "usr/lib/systemd/system/systemd-networkd-wait-online.service",
    ]
    static let osReleasePaths = ["usr/lib/os-release", "etc/os-release"]
    static let elfPaths = ["usr/bin/dpkg", "bin/dpkg", "usr/bin/env", "bin/ls", "usr/bin/ls"]
    /// Directories the additions need, in creation order.
    static let addedDirectories = [
        "etc", "etc/systemd", "etc/systemd/system", "etc/systemd/system-generators",
        "etc/systemd/system/multi-user.target.wants", "etc/systemd/system/network-online.target.wants",
    ]

    func prepareContainer(_ path: String, work: String) async throws(VirtError) -> [String] {
        let plain = try await decompress(path, work: work)
        let output = work + "/image.tar"
        let writer = try BlockWriter(path: output)
        var rewriter = RootfsRewriter(watchedPaths: [], capturedFiles: [])
        rewriter.watchedPaths = Set(
            Self.initPaths + Self.networkdUnits + Self.waitOnlineUnits + Self.addedDirectories)
        rewriter.capturedFiles = Set(Self.osReleasePaths + Self.elfPaths)
        let findings = try rewriter.rewrite(try BlockReader(path: plain), into: writer)
        if plain != path { unlink(plain) }

        guard Self.initPaths.contains(where: findings.presentPaths.contains) else {
            throw VirtError(
                .notFound,
                "\(path) has no /sbin/init or /usr/sbin/init: Incus cannot boot it as a system container "
                    + "(a debusine system tarball needs systemd-sysv)")
        }
        let architecture: String
        if let given = options.architecture {
            architecture = given
        } else {
            architecture = try Self.architecture(findings, path: path)
        }
        guard let incusArchitecture = Architecture.incusName(debian: architecture) else {
            throw VirtError(.usage, "unknown Debian architecture \(architecture)")
        }
        let osRelease =
            Self.osReleasePaths.lazy.compactMap { findings.captured[$0] }.first
            .map { ImageMetadata.parseOSRelease(String(decoding: $0, as: UTF8.self)) } ?? [:]
        let metadata = ImageMetadata(
            debianArchitecture: architecture,
            os: osRelease["NAME"].flatMap { $0.split(separator: " ").first.map(String.init) } ?? "Debian",
            release: osRelease["VERSION_CODENAME"].flatMap { $0.isEmpty ? nil : $0 } ?? osRelease["VERSION_ID"]
                ?? "unknown",
            artifactID: options.artifactID, description: options.description,
            creationDate: Int(time(nil)))

        let mtime = Int(time(nil))
        func member(_ name: String, type: Character, mode: Int, link: String = "", data: [UInt8] = []) throws(VirtError)
        {
            try writer.writeMember(
                TarHeader(
                    name: name, type: UInt8(ascii: type.unicodeScalars.first ?? "0"), mode: mode, size: data.count,
                    linkName: link, mtime: mtime),
                data: data)
        }
        for directory in Self.addedDirectories where !findings.presentPaths.contains(directory) {
            try member(RootfsRewriter.prefix + directory + "/", type: "5", mode: 0o755)
        }
        if let unit = Self.networkdUnits.first(where: findings.presentPaths.contains) {
            try member(
                RootfsRewriter.prefix + "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
                type: "2", mode: 0o777, link: "/" + unit)
            if let wait = Self.waitOnlineUnits.first(where: findings.presentPaths.contains) {
                try member(
                    RootfsRewriter.prefix
                        + "etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service",
                    type: "2", mode: 0o777, link: "/" + wait)
            }
        } else {
            log.warning("\(path) has no systemd-networkd: instances of it will not configure their network")
        }
        try member(
            RootfsRewriter.prefix + ContainerGenerator.path, type: "0", mode: 0o755,
            data: Array(ContainerGenerator.script.utf8))
        try member(
            "metadata.yaml", type: "0", mode: 0o644,
            data: Array(metadata.yaml(incusArchitecture: incusArchitecture).utf8))
        try member("templates/", type: "5", mode: 0o755)
        try member("templates/hostname.tpl", type: "0", mode: 0o644, data: Array(ImageMetadata.hostnameTemplate.utf8))
        try member("templates/hosts.tpl", type: "0", mode: 0o644, data: Array(ImageMetadata.hostsTemplate.utf8))
        try writer.write([UInt8](repeating: 0, count: 1024))
        try writer.flush()
        log.debug("\(findings.members) members rewritten under rootfs/")
        return [output]
    }

    static func architecture(_ findings: RootfsRewriter.Findings, path: String) throws(VirtError) -> String {
        for candidate in elfPaths {
            if let header = findings.captured[candidate], let architecture = Architecture.debian(elfHeader: header) {
                return architecture
            }
        }
        throw VirtError(.usage, "cannot tell the architecture of \(path) from its executables: pass --architecture")
    }

    /// The tarball as a plain tar file: `path` itself, or a decompressed copy in `work`.
    func decompress(_ path: String, work: String) async throws(VirtError) -> String {
        let magic = Self.readMagic(path)
        let tool: String
        switch magic {
        case let bytes where bytes.starts(with: [0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00]): tool = "xz"
        case let bytes where bytes.starts(with: [0x1F, 0x8B]): tool = "gzip"
        case let bytes where bytes.starts(with: [0x28, 0xB5, 0x2F, 0xFD]): tool = "zstd"
        case let bytes where bytes.starts(with: Array("BZh".utf8)): tool = "bzip2"
        default:
            guard magic.count >= 263, Array(magic[257..<262]) == Array("ustar".utf8) else {
                throw VirtError(.io, "\(path) is neither a tar archive nor a compressed one (xz, gzip, zstd, bzip2)")
            }
            return path
        }
        let output = work + "/rootfs.tar"
        let fd = Glibc.open(output, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw VirtError.io("cannot create \(output)") }
        let command = Command(tool, ["--decompress", "--stdout", "--", path])
        let result = try await runner.run(
            command, input: .none, output: .fileDescriptor(fd, closeAfterStart: true), error: .capture)
        guard result.status.succeeded else {
            throw VirtError(.io, "\(path) is corrupt: `\(command)` failed (\(result.status)): \(result.errorText)")
        }
        return output
    }

    static func readMagic(_ path: String) -> [UInt8] {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { Glibc.close(fd) }
        var bytes = [UInt8](repeating: 0, count: 512)
        let count = read(fd, &bytes, bytes.count)
        return count > 0 ? Array(bytes[0..<count]) : []
    }

    // MARK: - Virtual machines

    static let qcow2Magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB]

    /// Refuses a qcow2 that reads other files (a backing file, a `json:` backing specification,
    /// an external data file) or is encrypted: incusd would open them as root. Anything else
    /// is a tarball, whose raw member is converted with `-f raw`, never probed.
    static func checkDisk(_ path: String, name: String, runner: any CommandRunner) async throws(VirtError) {
        guard readMagic(path).starts(with: qcow2Magic) else { return }
        let absolute = AbsolutePath.of(path)
        _ = try await ImageInspection(runner: runner).inspect(absolute, name: name, boot: .none)
    }

    /// A split image: a metadata tarball and the disk as qcow2.
    func prepareVirtualMachine(_ path: String, work: String) async throws(VirtError) -> [String] {
        let magic = Self.readMagic(path)
        var disk = path
        if magic.starts(with: Self.qcow2Magic) {
            try await Self.checkDisk(path, name: path, runner: runner)
        } else {
            // A tarball holding one raw image: unpack it and convert it.
            let raw = try await unpackSingleImage(path, work: work)
            disk = work + "/rootfs.img"
            try await runner.check(Command("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, disk]))
            unlink(raw)
        }
        let architecture = options.architecture ?? Architecture.debian(machine: Host.machine) ?? "amd64"
        guard let incusArchitecture = Architecture.incusName(debian: architecture) else {
            throw VirtError(.usage, "unknown Debian architecture \(architecture)")
        }
        let metadata = ImageMetadata(
            debianArchitecture: architecture, os: "Debian", release: "unknown", artifactID: options.artifactID,
            description: options.description, creationDate: Int(time(nil)), withTemplates: false)
        let metaDirectory = work + "/meta"
        try Self.makeDirectory(metaDirectory)
        try Self.writeFile(metaDirectory + "/metadata.yaml", metadata.yaml(incusArchitecture: incusArchitecture))
        let metaTar = work + "/meta.tar"
        try await runner.check(
            Command("tar", ["--create", "--file", metaTar, "--directory", metaDirectory, "metadata.yaml"]))
        return [metaTar, disk]
    }

    /// The one raw image in the tarball at `path`, as a file of ours in `work`.
    ///
    /// Only a regular-file member is accepted: a symbolic link, hard link or device node
    /// (`disk.img -> /etc/shadow`, a link to `/dev/sda`) would have qemu-img convert a file or
    /// device of this host into the image. The member's type comes from tar's verbose listing,
    /// and its bytes are written by `tar --to-stdout` into a file we create, so even a member
    /// tar would turn into a link or device only ever yields its stored bytes here.
    func unpackSingleImage(_ path: String, work: String) async throws(VirtError) -> String {
        let listing = try await runner.run(Self.listMembers(path, verbose: false))
        guard listing.status.succeeded else {
            throw VirtError(.io, "\(path) is neither a qcow2 image nor a readable tarball: \(listing.errorText)")
        }
        let members = listing.outputText.split(separator: "\n").filter { !$0.hasSuffix("/") }
        guard members.count == 1, let member = members.first.map(String.init) else {
            throw VirtError(.usage, "\(path) must hold exactly one raw image, not \(members.count) files")
        }
        let verbose = try await runner.check(Self.listMembers(path, verbose: true))
        // Same members in the same order; directories are the lines of type `d`.
        let entries = verbose.split(separator: "\n").filter { !$0.hasPrefix("d") }
        guard entries.count == 1, let entry = entries.first else {
            throw VirtError(.io, "cannot tell the type of the member \(member) of \(path) from `tar --list --verbose`")
        }
        if let kind = Self.nonRegularKind(String(entry)) {
            throw VirtError(
                .badImage,
                "the member \(member) of \(path) is \(kind), not a regular file: refused, because its disk would be "
                    + "read from this host")
        }
        let output = work + "/rootfs.raw"
        let fd = Glibc.open(output, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw VirtError.io("cannot create \(output)") }
        let command = Self.extractMember(path, member)
        let result = try await runner.run(
            command, input: .none, output: .fileDescriptor(fd, closeAfterStart: true), error: .capture)
        guard result.status.succeeded else { throw VirtError.failed(command, result) }
        var info = stat()
        guard lstat(output, &info) == 0, info.st_mode & S_IFMT == S_IFREG, info.st_size > 0 else {
            throw VirtError(.badImage, "the member \(member) of \(path) is empty: it is not a disk image")
        }
        return output
    }

    /// `tar --list`, names only or `ls -l` style (whose first character is the member's type).
    static func listMembers(_ path: String, verbose: Bool) -> Command {
        Command("tar", ["--list"] + (verbose ? ["--verbose"] : []) + ["--file", path])
    }

    /// One member's stored bytes on stdout, whatever its type: tar makes no file, link or device.
    static func extractMember(_ path: String, _ member: String) -> Command {
        Command("tar", ["--extract", "--to-stdout", "--file", path, "--", member])
    }

    /// What a member is when it is not a regular file, from its `tar --list --verbose` line
    /// (`lrwxrwxrwx root/root 0 2026-12-02 05:25 disk.img -> /etc/shadow`); nil for a regular file.
    static func nonRegularKind(_ line: String) -> String? {
        guard let type = line.first, type != "-" else { return nil }
        func target(after marker: String) -> String {
            guard let range = line.range(of: marker) else { return "" }
            return " (to \(line[range.upperBound...]))"
        }
        switch type {
        case "l": return "a symbolic link" + target(after: " -> ")
        case "h": return "a hard link" + target(after: " link to ")
        case "b": return "a block device"
        case "c": return "a character device"
        case "p": return "a FIFO"
        default: return "of type `\(type)'"
        }
    }

    static func makeDirectory(_ path: String) throws(VirtError) {
        guard mkdir(path, 0o700) == 0 else { throw VirtError.io("cannot create \(path)") }
    }

    static func writeFile(_ path: String, _ text: String) throws(VirtError) {
        let writer = try BlockWriter(path: path)
        try writer.write(Array(text.utf8))
        try writer.flush()
    }
}
