import SystemPackage

/// Writes all of `bytes` to `fd`, through short writes and EINTR (swift-system's `writeAll`); a
/// failure is an ``VirtError/Code/io`` error saying `what` failed, with the system's reason.
public func writeAll(
    _ fd: Int32, _ bytes: some Sequence<UInt8>, _ what: @autoclosure () -> String
)
    throws(VirtError)
{
    do {
        _ = try FileDescriptor(rawValue: fd).writeAll(bytes)
    } catch let error as Errno {
        throw VirtError(.io, what(), errno: error.rawValue)
    } catch {
        throw VirtError(.io, "\(what()): \(error)")
    }
}
