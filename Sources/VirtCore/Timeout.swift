/// Runs `operation`, racing it against a timer in a task group.
///
/// When the timer wins, the operation's task is cancelled and a ``VirtError`` with code
/// ``VirtError/Code/timeout`` naming `what` is thrown. Operations that run subprocesses stop them
/// on cancellation, so nothing keeps running after the timeout.
public func withTimeout<T: Sendable>(
    _ duration: Duration,
    _ what: String,
    _ operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: duration)
            throw VirtError(.timeout, "\(what) timed out after \(duration.formattedSeconds)")
        }
        defer { group.cancelAll() }
        guard let first = try await group.next() else {
            throw VirtError(.internalError, "timeout race for \(what) ended without a result")
        }
        return first
    }
}

extension Duration {
    /// "1.5 s"-style text for messages.
    public var formattedSeconds: String {
        // components of a negative duration are both negative: "-3.-9 s" otherwise.
        if self < .zero { return "-" + (.zero - self).formattedSeconds }
        let (seconds, attoseconds) = components
        let tenths = attoseconds / 100_000_000_000_000_000
        return tenths == 0 ? "\(seconds) s" : "\(seconds).\(tenths) s"
    }
}
