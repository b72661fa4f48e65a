import Foundation

/// Runs CPU-bound test work (hashing megabytes in a debug build) on a thread of its own.
///
/// Swift Testing runs tests as tasks on the cooperative pool, two threads on a 2-core machine:
/// seconds of synchronous work there stall every other test's tasks, and tests with short
/// timeouts (a QGA command given 5 s) then fail for want of a thread.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: body()) }.start()
    }
}
