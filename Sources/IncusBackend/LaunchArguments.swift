import VirtCore

/// The `incus launch` arguments given after the image, as autopkgtest-virt-incus takes them
/// (everything after the image, with or without `--`), merged with what the server sets itself.
///
/// The server launches with `--ephemeral --quiet`, its profiles, `--vm` when asked, `--target`
/// when asked, and its owner labels (`--config user.debusine-virt.*`). Launch arguments that
/// say the same again are merged rather than passed twice: debusine calls
/// `debusine-virt-incus artifact/ID -- --profile debusine`, and Incus refuses a profile given
/// twice ("Duplicate profile found in request"). Everything else passes through, as given and in
/// order, to every instance the server makes (`incus launch`, and `incus init` for spares).
///
/// The arguments are read as Incus's own parser (cobra/pflag) reads them: `--flag value`,
/// `--flag=value`, `-f value`, `-fvalue`, `-f=value` and clusters of short flags (`-ep debusine`).
public struct LaunchArguments: Sendable, Equatable {
    /// The profiles to launch with: the server's, then those the arguments add.
    public var profiles: [String]
    public var virtualMachine: Bool
    public var target: String?
    /// What is passed through, after the server's own arguments.
    public var extraArguments: [String]

    /// The flags of `incus launch` 6.0 (and its global flags) that take a value.
    static let valueFlags: Set<String> = [
        "config", "description", "device", "environment-file", "network", "profile", "storage", "target", "type",
        "project",
    ]
    static let shortValueFlags: [Character: String] = [
        "c": "config", "d": "device", "n": "network", "p": "profile", "s": "storage", "t": "type",
    ]
    static let shortBooleanFlags: [Character: String] = ["e": "ephemeral", "h": "help", "q": "quiet", "v": "verbose"]

    /// Flags refused before the banner, and why: each would break the server or its instances.
    static let refused: [String: String] = [
        "console": "it attaches the console and never returns (and `incus init`, which makes spares, has no such flag)",
        "empty": "it makes an instance without the image",
        "no-profiles": "the server launches with its profiles (see --profile)",
        "project": "the server's other incus commands (exec, delete, gc) would not look in that project",
        "help": "it launches nothing", "version": "it launches nothing", "sub-commands": "it launches nothing",
    ]

    /// Merges `arguments` (as given after the image) into the server's own settings.
    ///
    /// Throws a usage error for flags the server cannot honour (``refused``), for a `--config`
    /// of the server's own `user.debusine-virt.*` labels, and for a `--target` other than the
    /// server's.
    public static func merge(
        _ arguments: [String], profiles: [String], virtualMachine: Bool, target: String?
    ) throws(VirtError) -> LaunchArguments {
        var result = LaunchArguments(
            profiles: profiles, virtualMachine: virtualMachine, target: target, extraArguments: [])
        var seenConfigs: Set<String> = []
        // One flag with its value, in long form, and the words it came as.
        func take(_ flag: String, _ value: String?, original: [String]) throws(VirtError) {
            if let reason = refused[flag] {
                throw VirtError(.usage, "the launch argument --\(flag) is not supported: \(reason)")
            }
            switch flag {
            case "ephemeral", "quiet", "vm":
                guard value == nil || value == "true" else {
                    throw VirtError(.usage, "the launch argument --\(flag)=\(value ?? "") is not supported")
                }
                // The server's own (every instance is ephemeral, and quiet), or its --vm.
                if flag == "vm" { result.virtualMachine = true }
                return
            case "profile":
                guard let value else { break }
                if result.profiles.contains(value) { return }
                result.profiles.append(value)
                return
            case "target":
                guard let value else { break }
                if let current = result.target, current != value {
                    throw VirtError(.usage, "--target \(current) and the launch argument --target \(value) disagree")
                }
                result.target = value
                return
            case "config":
                guard let value else { break }
                let key = value.split(separator: "=", maxSplits: 1).first.map(String.init) ?? value
                if key.hasPrefix(InstanceOwner.labelPrefix) {
                    throw VirtError(
                        .usage,
                        "the launch argument --config \(value) sets a label of the server's own "
                            + "(\(InstanceOwner.labelPrefix)*), which it uses to find its instances")
                }
                if !seenConfigs.insert(value).inserted { return }
            default:
                break
            }
            result.extraArguments += original
        }
        var index = arguments.startIndex
        while index < arguments.endIndex {
            let word = arguments[index]
            index += 1
            if word == "--" {
                // pflag stops reading flags here: the rest are positional words for incus.
                result.extraArguments += [word] + arguments[index...]
                break
            }
            if word.hasPrefix("--") && word.count > 2 {
                let body = word.dropFirst(2)
                if let equals = body.firstIndex(of: "=") {
                    try take(String(body[..<equals]), String(body[body.index(after: equals)...]), original: [word])
                } else if valueFlags.contains(String(body)), index < arguments.endIndex {
                    let value = arguments[index]
                    index += 1
                    try take(String(body), value, original: [word, value])
                } else {
                    try take(String(body), nil, original: [word])
                }
                continue
            }
            if word.hasPrefix("-") && word.count > 1 {
                // A cluster of short flags; the first that takes a value takes the rest of the
                // word (after an optional `=`), or the next word.
                var letters = Substring(word.dropFirst())
                var pieces: [(flag: String, value: String?, original: [String])] = []
                var unknown = false
                while let letter = letters.first {
                    letters = letters.dropFirst()
                    if let flag = shortBooleanFlags[letter] {
                        pieces.append((flag, nil, ["-\(letter)"]))
                    } else if let flag = shortValueFlags[letter] {
                        var value = String(letters.hasPrefix("=") ? letters.dropFirst() : letters)
                        letters = ""
                        var original = ["-\(letter)\(value)"]
                        if value.isEmpty {
                            guard index < arguments.endIndex else {
                                throw VirtError(.usage, "the launch argument -\(letter) needs a value")
                            }
                            value = arguments[index]
                            index += 1
                            original = ["-\(letter)", value]
                        }
                        pieces.append((flag, value, original))
                    } else {
                        unknown = true
                        break
                    }
                }
                if unknown {
                    // Not a flag incus knows: incus says so.
                    result.extraArguments.append(word)
                    continue
                }
                if pieces.count == 1, let piece = pieces.first {
                    // As given: `-p=x` stays `-p=x`.
                    try take(piece.flag, piece.value, original: [word] + piece.original.dropFirst())
                } else {
                    for piece in pieces { try take(piece.flag, piece.value, original: piece.original) }
                }
                continue
            }
            result.extraArguments.append(word)
        }
        return result
    }
}
