import Foundation

/// The machine a benchmark ran on, so figures are never read without it.
public struct Machine: Codable, Sendable, Equatable {
    public var hostname: String
    public var os: String
    public var kernel: String
    public var cpu: String
    public var cpus: Int
    public var memoryGiB: Double

    public static func current() -> Machine {
        var names = utsname()
        uname(&names)
        let kernel = withUnsafeBytes(of: &names.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let osRelease = (try? String(contentsOfFile: "/etc/os-release", encoding: .utf8)) ?? ""
        let os =
            osRelease.split(separator: "\n").first { $0.hasPrefix("PRETTY_NAME=") }
            .map { $0.dropFirst("PRETTY_NAME=".count).trimmingCharacters(in: CharacterSet(charactersIn: "\"")) }
            ?? "unknown"
        let cpuInfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let cpu =
            cpuInfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .flatMap { $0.split(separator: ":", maxSplits: 1).last }
            .map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown"
        return Machine(
            hostname: ProcessInfo.processInfo.hostName, os: os, kernel: kernel, cpu: cpu,
            cpus: ProcessInfo.processInfo.activeProcessorCount,
            memoryGiB: (Double(ProcessInfo.processInfo.physicalMemory) / Double(1 << 30) * 10).rounded() / 10)
    }

    public var summary: String { "\(os), kernel \(kernel), \(cpus) × \(cpu), \(Report.number(memoryGiB)) GiB" }
}

/// What one server did under one workload: every repetition's figures and their medians.
public struct BenchmarkResult: Codable, Sendable {
    public var label: String
    public var server: [String]
    /// ISO 8601, UTC.
    public var date: String
    public var machine: Machine
    public var workload: Workload
    /// Each repetition's figures by metric name (``Metric`` raw values).
    public var repetitions: [[String: Double]]
    public var median: [String: Double]

    public init(label: String, server: [String], workload: Workload, repetitions: [[Metric: Double]]) {
        self.label = label
        self.server = server
        date = ISO8601DateFormatter().string(from: Date())
        machine = Machine.current()
        self.workload = workload
        self.repetitions = repetitions.map { Dictionary(uniqueKeysWithValues: $0.map { ($0.key.rawValue, $0.value) }) }
        var median: [String: Double] = [:]
        for metric in Metric.allCases {
            if let value = Statistics.median(repetitions.compactMap({ $0[metric] })) { median[metric.rawValue] = value }
        }
        self.median = median
    }

    public func median(_ metric: Metric) -> Double? { median[metric.rawValue] }

    public func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(self)
    }

    public static func decode(_ data: Data) throws -> BenchmarkResult {
        try JSONDecoder().decode(BenchmarkResult.self, from: data)
    }
}
