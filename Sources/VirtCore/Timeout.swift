/// Runs `operation`, racing it against a timer in a task group: the one timeout of the project.
///
/// When the timer wins, the operation's task is cancelled and a ``VirtError`` with code
/// ``VirtError/Code/timeout`` naming `what` is thrown. Operations that run subprocesses stop them
/// on cancellation, so nothing keeps running after the timeout. Every failure is a ``VirtError``:
/// the operation's own, a timeout when the calling task was cancelled, an internal error for
/// anything else.
@discardableResult
public func withTimeout<T: Sendable>(
    _ duration: Duration,
    _ what: String,
    _ operation: @escaping @Sendable () async throws -> T
) async throws(VirtError) -> T {
    do {
        return try await withThrowingTaskGroup(of: T.self) { group in
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
    } catch let error as VirtError {
        throw error
    } catch is CancellationError {
        throw VirtError(.timeout, "\(what) was cancelled")
    } catch {
        throw VirtError(.internalError, "\(what): \(error)")
    }
}

/// A point in time that several waits share, each taking what is left of it.
public struct Deadline: Sendable {
    public let instant: ContinuousClock.Instant

    public init(after duration: Duration) { instant = .now + duration }

    public init(_ instant: ContinuousClock.Instant) { self.instant = instant }

    /// A deadline that never comes (a hundred years on), for waits that end only by cancellation.
    public static var none: Deadline { Deadline(after: .seconds(100 * 365 * 86_400)) }

    /// The time left, never less than `floor` (a wait of zero would not wait at all), nor more
    /// than `atMost`.
    public func remaining(atMost limit: Duration? = nil, floor: Duration = .milliseconds(1)) -> Duration {
        let left = max(instant - .now, floor)
        return limit.map { min(left, $0) } ?? left
    }

    public var hasPassed: Bool { ContinuousClock.now >= instant }

    /// Calls `check` every `interval` until it gives a value, which is returned; nil once the
    /// deadline has passed (`check` runs at least once) or the calling task is cancelled.
    ///
    /// The one sleep-and-retry loop: for state only visible by asking (QMP's migration status, a
    /// command's exit code in a guest, a socket that is not listening yet).
    public func poll<T, Failure: Error>(
        isolation: isolated (any Actor)? = #isolation, every interval: Duration,
        _ check: () async throws(Failure) -> T?
    ) async throws(Failure) -> T? {
        while true {
            if let value = try await check() { return value }
            guard !hasPassed, !Task.isCancelled else { return nil }
            do {
                try await Task.sleep(for: min(interval, remaining()))
            } catch {
                return nil
            }
        }
    }

    /// ``poll(every:_:)`` for a condition: true once `condition` held, false when time ran out.
    public func poll<Failure: Error>(
        isolation: isolated (any Actor)? = #isolation, every interval: Duration,
        until condition: () async throws(Failure) -> Bool
    ) async throws(Failure) -> Bool {
        try await poll(every: interval) { () async throws(Failure) -> Bool? in try await condition() ? true : nil }
            ?? false
    }
}

extension Duration {
    /// The duration in seconds, as a floating-point number (for figures, not messages).
    public var seconds: Double {
        let (whole, attoseconds) = components
        return Double(whole) + Double(attoseconds) / 1e18
    }

    /// "1.5 s"-style text for messages.
    public var formattedSeconds: String {
        // components of a negative duration are both negative: "-3.-9 s" otherwise.
        if self < .zero { return "-" + (.zero - self).formattedSeconds }
        let (seconds, attoseconds) = components
        let tenths = attoseconds / 100_000_000_000_000_000
        return tenths == 0 ? "\(seconds) s" : "\(seconds).\(tenths) s"
    }
}
