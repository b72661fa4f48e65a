import CommandRunner
import ImageCache
import Synchronization
import VirtCore

/// The image a server boots, looked at once before its banner: a local path, or a URL fetched
/// into the image cache, goes through ``ImageInspection``, so that an image that must not be
/// booted is refused within seconds with a message saying why, not at `open`.
public enum BootImage {
    /// Inspects `image` (an absolute path, or an http(s):// or file:// URL, fetched first) and
    /// returns what QEMU may boot. `name` is what the user gave, for messages. A URL's download
    /// is inspected before it enters the cache, so a refused image leaves no entry there.
    ///
    /// `boot` says what the disk must boot with (see ``BootCheck``); the result says which
    /// firmware boots it.
    public static func prepare(
        _ image: String, name: String? = nil, sha256: String?, cacheDirectory: String?,
        boot: BootCheck = .firmware(.efi), runner: any CommandRunner = SubprocessRunner()
    ) async throws(VirtError) -> InspectedImage {
        let inspection = ImageInspection(runner: runner)
        let name = name ?? image
        guard ImageCache.isURL(image) else {
            return try await inspection.inspect(image, name: name, boot: boot)
        }
        // The cache runs the inspection on what becomes (or is) the entry; its result is kept
        // rather than inspecting the entry a second time. What it refuses it removes, so it asks
        // only whether some firmware boots the image: an image the other firmware boots is no
        // bad image, and a `--boot` that does not fit it is refused below, keeping the entry.
        let found = Mutex<InspectedImage?>(nil)
        let path = try await ImageCache(directory: cacheDirectory, runner: runner).fetch(image, sha256: sha256) {
            path throws(VirtError) in
            let inspected = try await inspection.inspect(path, name: name, boot: boot == .none ? .none : .auto)
            found.withLock { $0 = inspected }
        }
        guard var inspected = found.withLock({ $0 }) else {
            throw VirtError(.internalError, "the image cache handed out \(path) without inspecting it")
        }
        if case .firmware(let firmware) = boot, inspected.firmware != firmware {
            inspected = try await inspection.inspect(path, name: name, boot: boot)
        }
        inspected.path = path
        return inspected
    }
}
