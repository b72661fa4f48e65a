import CommandRunner
import Foundation
import Testing
import VirtCore
import VirtTestSupport

/// The project-built test images work with the real tools: QEMU (TCG) boots the EFI image to a
/// responding guest agent and its agent-less variant to a root login on the serial console, and
/// Incus imports the system tarball and runs a container from it.
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
        // The script's 180 s for the agent is for a quiet machine; a test run keeps the machine
        // busy (180 s ran out once).
        let result = try await SubprocessRunner().run(
            Command(
                "\(TestPaths.repositoryRoot)/scripts/check-test-images", [part, directory],
                environment: ["CHECK_AGENT_TIMEOUT": "900"]),
            input: .none, output: .capture, error: .standardError)
        let output = result.outputText
        #expect(result.status == .exited(0), "check-test-images \(part) failed:\n\(output)")
        return output
    }

    @Test(
        "QEMU under TCG boots the EFI image to a responding guest agent", .enabled(if: available),
        .guestSlot(minutes: 20))
    func qemuBootsImage() async throws {
        let output = try await runCheck("--qemu-only")
        #expect(output.contains("1 passed, 0 failed"), "\(output)")
    }

    // The agent-less variant (`check-test-images --noagent-only`) is not booted here: the agent
    // install tests in QemuBackendTests boot it and install from its repository, and one VM
    // fewer at the start of a test run keeps the others within their boot timeouts.

    @Test("incus image import accepts the system tarball and a container runs from it", .enabled(if: available))
    func incusImportsTarball() async throws {
        let output = try await runCheck("--incus-only")
        #expect(output.contains("1 passed, 0 failed"), "\(output)")
    }
}
