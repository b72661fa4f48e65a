import Foundation

/// Tables of results: plain text for a terminal, Markdown for docs/.
public enum Report {
    public enum Style: Sendable {
        case text
        case markdown
    }

    /// Three significant figures, no exponent.
    public static func number(_ value: Double) -> String {
        let magnitude = abs(value)
        let decimals = magnitude >= 100 ? 0 : magnitude >= 10 ? 1 : magnitude >= 1 ? 2 : 3
        return String(format: "%.\(decimals)f", value)
    }

    /// One result: the median and every repetition of each metric it has.
    public static func table(_ result: BenchmarkResult, style: Style) -> String {
        let count = result.repetitions.count
        var rows = [["metric", "median", "unit"] + (1...max(count, 1)).map { "run \($0)" }]
        for metric in Metric.allCases {
            guard let median = result.median(metric) else { continue }
            rows.append(
                [metric.title, number(median), metric.unit]
                    + result.repetitions.map { $0[metric.rawValue].map(number) ?? "-" })
        }
        return render(rows, style: style, numericFrom: 1)
    }

    /// Two results side by side with ours/theirs ratios and, where the backend has one, the
    /// target for each ratio and whether it is met.
    public static func comparison(
        ours: BenchmarkResult, theirs: BenchmarkResult, targets: [Target], style: Style
    ) -> String {
        var rows = [["metric", ours.label, theirs.label, "unit", "ours/theirs", "target", "met"]]
        for metric in Metric.allCases {
            let mine = ours.median(metric)
            let other = theirs.median(metric)
            guard mine != nil || other != nil else { continue }
            let ratio = mine.flatMap { mine in other.flatMap { $0 > 0 ? mine / $0 : nil } }
            let target = targets.first { $0.metric == metric }
            let met = target.flatMap { target in ratio.map { target.isMet(by: $0) ? "yes" : "NO" } } ?? ""
            rows.append([
                metric.title, mine.map(number) ?? "-", other.map(number) ?? "-", metric.unit,
                ratio.map(number) ?? "-", target?.text ?? "", met,
            ])
        }
        return render(rows, style: style, numericFrom: 1)
    }

    /// What was compared, for the lines above a comparison table in docs/.
    public static func comparisonPreamble(ours: BenchmarkResult, theirs: BenchmarkResult) -> String {
        let workload = ours.workload
        func skipped(_ result: BenchmarkResult) -> String {
            result.workload.skipped.isEmpty
                ? "" : " (not exercised: \(result.workload.skipped.joined(separator: ", ")))"
        }
        return """
            - \(ours.label): `\(ours.server.joined(separator: " "))`\(skipped(ours))
            - \(theirs.label): `\(theirs.server.joined(separator: " "))`\(skipped(theirs))
            - \(ours.date == theirs.date ? ours.date : "ours \(ours.date), theirs \(theirs.date)"), \(ours.machine.summary)
            - medians of \(workload.repetitions) sessions each; \(workload.auxverbCalls) auxverb calls per session; \(
                workload.streamBytes >> 20) MiB streamed each way; one \(workload.copyBytes >> 20) MiB file and \(
                workload.treeFiles) small files copied each way, verified byte for byte


            """
    }

    static func render(_ rows: [[String]], style: Style, numericFrom: Int) -> String {
        let columns = rows.map(\.count).max() ?? 0
        let padded = rows.map { $0 + Array(repeating: "", count: columns - $0.count) }
        switch style {
        case .markdown:
            var lines = ["| " + padded[0].joined(separator: " | ") + " |"]
            lines.append("|" + (0..<columns).map { $0 >= numericFrom ? " ---: |" : " --- |" }.joined())
            lines += padded.dropFirst().map { "| " + $0.joined(separator: " | ") + " |" }
            return lines.joined(separator: "\n") + "\n"
        case .text:
            let widths = (0..<columns).map { column in padded.map { $0[column].count }.max() ?? 0 }
            return padded.map { row in
                row.enumerated().map { column, cell in
                    let padding = String(repeating: " ", count: widths[column] - cell.count)
                    return column >= numericFrom ? padding + cell : cell + padding
                }.joined(separator: "  ")
            }.joined(separator: "\n") + "\n"
        }
    }
}
