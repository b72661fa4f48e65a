import Foundation
import VirtCore

/// What a testbed has and uses at one moment, as its backend reads it; nil where unknown.
/// Sizes are bytes.
public struct ResourceSample: Sendable, Equatable {
    public var cpuCount: Int?
    /// The testbed's Debian architecture (`dpkg --print-architecture`).
    public var architecture: String?
    /// Memory the testbed may use, and the part of it in use now (not free: page cache counts,
    /// as in debusine's reading of Incus metrics, MemTotal - MemFree).
    public var availableMemory: UInt64?
    public var memory: UInt64?
    /// The highest `memory` since the testbed started, where the kernel keeps it (a container's
    /// cgroup memory.peak); sampling alone misses what lives between two samples.
    public var memoryPeak: UInt64?
    /// Size of the testbed's root filesystem, and the part in use.
    public var availableDiskSpace: UInt64?
    public var diskSpace: UInt64?
    /// What the testbed's disk takes on the host (a VM's overlay), where the backend knows it.
    public var hostDiskSpace: UInt64?

    public init(
        cpuCount: Int? = nil, architecture: String? = nil, availableMemory: UInt64? = nil, memory: UInt64? = nil,
        memoryPeak: UInt64? = nil, availableDiskSpace: UInt64? = nil, diskSpace: UInt64? = nil,
        hostDiskSpace: UInt64? = nil
    ) {
        self.cpuCount = cpuCount
        self.architecture = architecture
        self.availableMemory = availableMemory
        self.memory = memory
        self.memoryPeak = memoryPeak
        self.availableDiskSpace = availableDiskSpace
        self.diskSpace = diskSpace
        self.hostDiskSpace = hostDiskSpace
    }
}

/// Reads a ``ResourceSample`` inside the testbed with one fixed script through the auxverb: what
/// every backend can do. A container's memory is its cgroup's (v2 or v1), with the kernel's own
/// peak; a VM's is its kernel's.
public enum ResourceProbe {
    /// `$1` is `full` for the facts that do not change (CPUs, architecture), read once.
    static let script = #"""
        cg=/sys/fs/cgroup
        cgroup() {
            if [ -r "$1" ] && [ -r "$2" ]; then
                read -r max < "$1"
                read -r current < "$2"
                peak=-
                if [ -r "$3" ]; then read -r peak < "$3"; fi
                echo "cgroup $max $current $peak"
                return 0
            fi
            return 1
        }
        # cgroup v2 has these files in non-root groups only: a container's, not a VM's. v1 has
        # them at the root too, where they count the whole system.
        cgroup "$cg/memory.max" "$cg/memory.current" "$cg/memory.peak" ||
            cgroup "$cg/memory/memory.limit_in_bytes" "$cg/memory/memory.usage_in_bytes" \
                "$cg/memory/memory.max_usage_in_bytes" || :
        while read -r key value unit; do
            case $key in MemTotal: | MemFree:) echo "meminfo $key $value" ;; esac
        done < /proc/meminfo
        echo "disk $(stat -f -c '%S %b %f' /)"
        if [ "$1" = full ]; then
            echo "cpus $(nproc)"
            echo "architecture $(dpkg --print-architecture 2>/dev/null)"
        fi
        """#

    /// Runs the probe in `testbed`.
    public static func sample(_ testbed: InTestbed, full: Bool) async throws(VirtError) -> ResourceSample {
        parse(try await testbed.script(script, [full ? "full" : "usage"]))
    }

    /// The probe's output as a sample; lines it does not know, or numbers that are no numbers
    /// (the testbed is not trusted), leave fields nil.
    public static func parse(_ output: String) -> ResourceSample {
        var sample = ResourceSample()
        var memTotal: UInt64?
        var memFree: UInt64?
        var cgroup: (max: UInt64?, current: UInt64?, peak: UInt64?)?
        for line in output.split(separator: "\n") {
            let words = line.split(separator: " ").map(String.init)
            guard let kind = words.first else { continue }
            switch (kind, words.count) {
            case ("cgroup", 4):
                cgroup = (UInt64(words[1]), UInt64(words[2]), UInt64(words[3]))
            case ("meminfo", 3):
                let kibibytes = UInt64(words[2]).flatMap { multiplied($0, 1024) }
                if words[1] == "MemTotal:" { memTotal = kibibytes } else { memFree = kibibytes }
            case ("disk", 4):
                if let blockSize = UInt64(words[1]), let blocks = UInt64(words[2]), let free = UInt64(words[3]),
                    free <= blocks
                {
                    sample.availableDiskSpace = multiplied(blocks, blockSize)
                    sample.diskSpace = multiplied(blocks - free, blockSize)
                }
            case ("cpus", 2):
                sample.cpuCount = Int(words[1]).flatMap { $0 > 0 ? $0 : nil }
            case ("architecture", 2):
                let name = words[1]
                if !name.isEmpty, name.utf8.count <= 32,
                    name.utf8.allSatisfy({
                        $0 >= 0x30 && $0 <= 0x39 || $0 >= 0x61 && $0 <= 0x7a || $0 == 0x5f || $0 == 0x2d
                    })
                {
                    sample.architecture = name
                }
            default:
                continue
            }
        }
        if let cgroup, let current = cgroup.current {
            // No limit ("max" in v2, about 2^63 in v1): what the kernel it runs on has.
            sample.availableMemory = [cgroup.max, memTotal].compactMap { $0 }.min()
            sample.memory = current
            sample.memoryPeak = cgroup.peak
        } else if let memTotal, let memFree, memFree <= memTotal {
            sample.availableMemory = memTotal
            sample.memory = memTotal - memFree
        }
        return sample
    }

    private static func multiplied(_ a: UInt64, _ b: UInt64) -> UInt64? {
        let (product, overflow) = a.multipliedReportingOverflow(by: b)
        return overflow ? nil : product
    }
}

/// The `--statistics-file` of a server: what its testbed had and used over the session, as one
/// JSON object replaced atomically (a temporary file renamed over it), so a reader never sees a
/// partial one. Peaks are the highest of all samples; `open_seconds` and `revert_seconds` list
/// every open and revert.
public actor StatisticsFile {
    /// The option's help, for both servers.
    public static let optionHelp =
        "Write what the testbed had and used (CPUs, memory, disk, open and revert times) to this JSON file: "
        + "replaced whole after every open, revert and reboot, every few seconds while open, and at close."

    /// The file's description for both servers' manual pages.
    public static let manual = """
        --statistics-file PATH writes one JSON object, replaced whole (never partly written) at \
        start-up, after every open, revert and reboot, after every sample (every 3 s while the \
        testbed is open) and at close: backend (qemu, incus-lxc, incus-vm) and image; \
        architecture and cpu_count of the testbed; available_memory and memory, its peak in use \
        (bytes; a VM's MemTotal - MemFree, a container's cgroup usage and memory.peak); \
        available_disk_space and disk_space, the size and peak used bytes of the testbed's root \
        file system; host_disk_space, the peak bytes the VM's overlay takes on the host (QEMU \
        only); \
        open_seconds and revert_seconds, lists of seconds; samples, how many readings the peaks \
        are of. Unknown values are null.
        """

    public let path: String
    /// What is known so far: what the file says after the next write.
    private(set) var document: Document
    /// The first write failure after start-up is logged; later ones would only repeat it.
    private var reportedFailure = false

    /// Writes the first version of the file: a path that cannot be written fails here, before
    /// the banner, rather than after the session.
    public init(path: String, backend: String, image: String) throws(VirtError) {
        self.path = path
        document = Document(backend: backend, image: image)
        try Self.replace(path, with: Self.encode(document))
    }

    /// Whether the facts that do not change (CPUs, architecture) are still to be read.
    public var needsFullSample: Bool { document.cpuCount == nil || document.architecture == nil }

    public func record(_ sample: ResourceSample) {
        func peak(_ kept: inout UInt64?, _ values: UInt64?...) {
            for value in values.compactMap({ $0 }) { kept = max(kept ?? 0, value) }
        }
        document.samples += 1
        if let value = sample.cpuCount { document.cpuCount = value }
        if let value = sample.architecture { document.architecture = value }
        peak(&document.availableMemory, sample.availableMemory)
        peak(&document.memory, sample.memory, sample.memoryPeak)
        peak(&document.availableDiskSpace, sample.availableDiskSpace)
        peak(&document.diskSpace, sample.diskSpace)
        peak(&document.hostDiskSpace, sample.hostDiskSpace)
    }

    public func opened(after duration: Duration) { document.openSeconds.append(duration.seconds) }

    public func reverted(after duration: Duration) { document.revertSeconds.append(duration.seconds) }

    /// Replaces the file with what is known now. A failure is logged, not thrown: the session
    /// goes on, and the file keeps its previous, whole, version.
    public func write() {
        do {
            try Self.replace(path, with: Self.encode(document))
        } catch {
            if !reportedFailure { log.error("cannot update the statistics file: \(error.message)") }
            reportedFailure = true
        }
    }

    /// The file's fields; unknown values are `null`, never left out.
    struct Document: Encodable {
        var backend: String
        var image: String
        var architecture: String?
        var cpuCount: Int?
        var availableMemory: UInt64?
        var memory: UInt64?
        var availableDiskSpace: UInt64?
        var diskSpace: UInt64?
        var hostDiskSpace: UInt64?
        var openSeconds: [Double] = []
        var revertSeconds: [Double] = []
        var samples = 0

        init(backend: String, image: String) {
            self.backend = backend
            self.image = image
        }

        enum CodingKeys: String, CodingKey {
            case backend, image, architecture, samples
            case cpuCount = "cpu_count"
            case availableMemory = "available_memory"
            case memory
            case availableDiskSpace = "available_disk_space"
            case diskSpace = "disk_space"
            case hostDiskSpace = "host_disk_space"
            case openSeconds = "open_seconds"
            case revertSeconds = "revert_seconds"
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(backend, forKey: .backend)
            try container.encode(image, forKey: .image)
            try container.encode(architecture, forKey: .architecture)
            try container.encode(cpuCount, forKey: .cpuCount)
            try container.encode(availableMemory, forKey: .availableMemory)
            try container.encode(memory, forKey: .memory)
            try container.encode(availableDiskSpace, forKey: .availableDiskSpace)
            try container.encode(diskSpace, forKey: .diskSpace)
            try container.encode(hostDiskSpace, forKey: .hostDiskSpace)
            // Milliseconds are all a reader can use; more digits would only be noise.
            try container.encode(openSeconds.map { ($0 * 1000).rounded() / 1000 }, forKey: .openSeconds)
            try container.encode(revertSeconds.map { ($0 * 1000).rounded() / 1000 }, forKey: .revertSeconds)
            try container.encode(samples, forKey: .samples)
        }
    }

    static func encode(_ document: Document) throws(VirtError) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        do {
            return Array(try encoder.encode(document)) + [0x0A]
        } catch {
            throw VirtError(.internalError, "cannot encode the statistics: \(error)")
        }
    }

    /// The process's umask, read where reading it does not change it (umask(2) would, for every
    /// thread, for a moment); 077 if unknown.
    static let umask: mode_t = {
        for line in (SmallFile.text("/proc/self/status") ?? "").split(separator: "\n")
        where line.hasPrefix("Umask:") {
            if let mask = mode_t(line.dropFirst(6).trimmingCharacters(in: .whitespaces), radix: 8) {
                return mask & 0o777
            }
        }
        return 0o077
    }()

    /// Writes `bytes` to a new file beside `path` and renames it over `path` (a symbolic link
    /// there is replaced, not followed).
    static func replace(_ path: String, with bytes: [UInt8]) throws(VirtError) {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        guard !name.isEmpty, name != ".", name != ".." else {
            throw VirtError(.usage, "the statistics file \(path) names a directory, not a file")
        }
        let (fd, temporary): (Int32, String)
        do throws(VirtError) {
            (fd, temporary) = try TemporaryFile.make(prefix: "\(directory)/.\(name).")
        } catch {
            throw VirtError(
                .unavailable, "cannot write the statistics file \(path)", errno: error.underlying ?? EIO)
        }
        do throws(VirtError) {
            defer { Glibc.close(fd) }
            try writeAll(fd, bytes, "cannot write the statistics file \(path)")
            // mkstemp makes it 0600: the mode any new file of the caller's gets instead. No
            // fsync: renaming is what makes it atomic for readers, and it would stall a thread
            // of the cooperative pool under I/O load.
            guard fchmod(fd, 0o666 & ~Self.umask) == 0 else {
                throw VirtError(.io, "cannot write the statistics file \(path)", errno: errno)
            }
            guard rename(temporary, path) == 0 else {
                throw VirtError(.io, "cannot replace the statistics file \(path)", errno: errno)
            }
        } catch {
            unlink(temporary)
            throw error
        }
    }
}
