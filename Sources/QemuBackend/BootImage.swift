import CommandRunner
import ImageCache
import VirtCore

/// The image a server boots, looked at once before its banner: a local path, or a URL fetched
/// into the image cache, goes through ``ImageInspection``, so that an image that must not be
/// booted is refused within seconds with a message saying why, not at `open`.
public enum BootImage {
    /// Inspects `image` (an absolute path, or an http(s):// or file:// URL, fetched first) and
    /// returns what QEMU may boot. `name` is what the user gave, for messages. A URL's download
    /// is inspected before it enters the cache, so a refused image leaves no entry there.
    ///
    /// `requireEFISystemPartition` is for EFI boots (the only kind today): the disk must have a
    /// partition table with an EFI system partition.
    public static func prepare(
        _ image: String, name: String? = nil, sha256: String?, cacheDirectory: String?,
        requireEFISystemPartition: Bool = true, runner: any CommandRunner = SubprocessRunner()
    ) async throws(VirtError) -> InspectedImage {
        let inspection = ImageInspection(runner: runner)
        let name = name ?? image
        guard ImageCache.isURL(image) else {
            return try await inspection.inspect(image, name: name, requireEFISystemPartition: requireEFISystemPartition)
        }
        let path = try await ImageCache(directory: cacheDirectory, runner: runner).fetch(image, sha256: sha256) {
            path throws(VirtError) in
            _ = try await inspection.inspect(path, name: name, requireEFISystemPartition: requireEFISystemPartition)
        }
        // Again on the entry itself, which is what boots: milliseconds.
        return try await inspection.inspect(path, name: name, requireEFISystemPartition: requireEFISystemPartition)
    }
}
