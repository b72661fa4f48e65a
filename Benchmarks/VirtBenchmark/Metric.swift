/// One figure the benchmark measures, with how it is shown and which direction is better.
public enum Metric: String, CaseIterable, Codable, Sendable {
    case banner = "start_to_banner_s"
    case open = "open_s"
    case printExecuteCommand = "print_execute_command_s"
    case auxverbMedian = "auxverb_true_median_s"
    case auxverbP95 = "auxverb_true_p95_s"
    case stdoutThroughput = "auxverb_stdout_MBps"
    case stdinThroughput = "auxverb_stdin_MBps"
    case copydownFile = "copydown_file_s"
    case copyupFile = "copyup_file_s"
    case copydownTree = "copydown_tree_s"
    case copyupTree = "copyup_tree_s"
    case revert = "revert_s"
    case reboot = "reboot_s"
    case close = "close_s"
    case peakRSS = "server_peak_rss_MiB"

    /// The row title in tables.
    public var title: String {
        switch self {
        case .banner: "start to banner"
        case .open: "open"
        case .printExecuteCommand: "print-execute-command"
        case .auxverbMedian: "auxverb `true`, median"
        case .auxverbP95: "auxverb `true`, p95"
        case .stdoutThroughput: "auxverb stdout"
        case .stdinThroughput: "auxverb stdin"
        case .copydownFile: "copydown, one file"
        case .copyupFile: "copyup, one file"
        case .copydownTree: "copydown, tree"
        case .copyupTree: "copyup, tree"
        case .revert: "revert"
        case .reboot: "reboot"
        case .close: "close"
        case .peakRSS: "server peak RSS"
        }
    }

    public var unit: String {
        switch self {
        case .stdoutThroughput, .stdinThroughput: "MB/s"
        case .peakRSS: "MiB"
        default: "s"
        }
    }

    /// Throughputs are better high; times and memory are better low.
    public var higherIsBetter: Bool { self == .stdoutThroughput || self == .stdinThroughput }
}

/// A goal for the ratio ours/theirs of one metric, as the benchmark issue states them.
public struct Target: Sendable, Equatable {
    public var metric: Metric
    /// The bound on ours/theirs: an upper bound for times, a lower bound for throughputs.
    public var ratio: Double

    public func isMet(by value: Double) -> Bool {
        metric.higherIsBetter ? value >= ratio : value <= ratio
    }

    public var text: String { (metric.higherIsBetter ? ">= " : "<= ") + Report.number(ratio) }

    /// The targets for a backend's servers, by the name the comparison is given.
    public static func forBackend(_ name: String) -> [Target] {
        switch name {
        case "incus":
            [
                Target(metric: .open, ratio: 0.5), Target(metric: .auxverbMedian, ratio: 0.5),
                Target(metric: .revert, ratio: 0.2), Target(metric: .stdoutThroughput, ratio: 1.0),
                Target(metric: .stdinThroughput, ratio: 1.0),
            ]
        case "qemu":
            [
                // Open and revert restore a saved VM state (issue 8): a warm open, once a first
                // boot saved it.
                Target(metric: .open, ratio: 0.1), Target(metric: .auxverbMedian, ratio: 0.1),
                Target(metric: .stdoutThroughput, ratio: 3.0), Target(metric: .stdinThroughput, ratio: 3.0),
                // "Copies >= 1.0" as speed is ours/theirs <= 1.0 as time.
                Target(metric: .copydownFile, ratio: 1.0), Target(metric: .copyupFile, ratio: 1.0),
                Target(metric: .copydownTree, ratio: 1.0), Target(metric: .copyupTree, ratio: 1.0),
                Target(metric: .revert, ratio: 0.05),
            ]
        case "qemu-arm64":
            // A foreign guest under TCG: a boot takes minutes, a restore about as long as amd64's
            // (issue 17).
            [Target(metric: .open, ratio: 0.02), Target(metric: .revert, ratio: 0.02)]
        default: []
        }
    }
}
