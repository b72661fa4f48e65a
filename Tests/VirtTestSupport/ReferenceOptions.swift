/// Option names from a Python argparse source file and from an ArgumentParser help text.
public enum ReferenceOptions {
    /// The option strings of every `add_argument('-x', '--long', ...)` call.
    public static func names(inArgparseSource source: String) -> Set<String> {
        var names: Set<String> = []
        var rest = Substring(source)
        while let call = rest.range(of: "add_argument(") {
            rest = rest[call.upperBound...]
            // The leading string literals, up to the first keyword argument.
            var arguments = rest.prefix { $0 != "=" && $0 != ")" }
            while let open = arguments.firstIndex(where: { $0 == "'" || $0 == "\"" }) {
                let quote = arguments[open]
                let after = arguments.index(after: open)
                guard let close = arguments[after...].firstIndex(of: quote) else { break }
                let word = arguments[after..<close]
                if word.hasPrefix("-") { names.insert(String(word)) }
                arguments = arguments[arguments.index(after: close)...]
            }
        }
        return names
    }

    /// Every `-x` and `--long` word of a help text.
    public static func names(inHelp help: String) -> Set<String> {
        let words = help.split(whereSeparator: { " \n,[]".contains($0) }).map {
            $0.split(separator: "=").first.map(String.init) ?? ""
        }
        return Set(words.filter { ($0.hasPrefix("--") && $0.count > 2) || ($0.count == 2 && $0.hasPrefix("-")) })
    }
}

extension ServerProcess {
    /// stderr once it contains `text`, or what it has after 5 s: the thread reading it may lag
    /// behind the server (its exit, or a reply on stdout that was already read).
    public func standardError(containing text: String) async -> String {
        var collected = standardError
        for _ in 0..<50 where !collected.contains(text) {
            try? await Task.sleep(for: .milliseconds(100))
            collected = standardError
        }
        return collected
    }
}
