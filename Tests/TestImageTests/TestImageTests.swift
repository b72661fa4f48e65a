import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// The project-built test images work with the real tools: Incus imports the system tarball and
/// runs a container from it. (The QEMU images are booted by the server's own tests.)
///
/// Needs DEBUSINE_VIRT_TEST_IMAGES (set by scripts/test). Outside CI, missing images skip these
/// tests; in CI (CI=true) they fail instead.
@Suite("Project-built test images", .serialized)
struct TestImageTests {
    static let imageDirectory = ProcessInfo.processInfo.environment["DEBUSINE_VIRT_TEST_IMAGES"]
    static let available = imageDirectory != nil || TestPaths.isCI

    func runCheck(_ part: String) async throws -> String {
        let directory = try #require(
            Self.imageDirectory, "DEBUSINE_VIRT_TEST_IMAGES is not set: run the suite through scripts/test")
        let result = try await SubprocessRunner().run(
            Command("\(TestPaths.repositoryRoot)/scripts/check-test-images", [part, directory]),
            input: .none, output: .capture, error: .standardError)
        let output = result.outputText
        #expect(result.status == .exited(0), "check-test-images \(part) failed:\n\(output)")
        return output
    }

    // The EFI image (`check-test-images --qemu-only`, plain QEMU to a responding agent) and its
    // agent-less variant (`--noagent-only`) are not booted here: every QEMU test of the server
    // boots or restores the EFI image (SavedStateTests boots it cold, with --no-snapshot, to a
    // responding agent), and the agent install tests boot the agent-less one. A cold boot costs
    // a guest slot for a minute or more in a test run; the script stays for checking images by hand.

    @Test("incus image import accepts the system tarball and a container runs from it", .enabled(if: available))
    func incusImportsTarball() async throws {
        let output = try await runCheck("--incus-only")
        #expect(output.contains("1 passed, 0 failed"), "\(output)")
    }
}
