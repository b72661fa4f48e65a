import Foundation
import Testing
import VirtTestSupport

/// The prefix scripts/test installed the release build into (scripts/install), and a PATH with
/// it first, so the clients find the servers by their bare names as users' do.
enum Installed {
    static let environment = ProcessInfo.processInfo.environment
    static let prefix = environment["DEBUSINE_VIRT_INSTALL_PREFIX"]
    static let qemuImages = environment["DEBUSINE_VIRT_TEST_IMAGES"]
    static let incusImage = environment["DEBUSINE_VIRT_INCUS_IMAGE"]

    static var canRunIncus: Bool { (prefix != nil && incusImage != nil) || TestPaths.isCI }
    static var canRunQemu: Bool { (prefix != nil && qemuImages != nil) || TestPaths.isCI }
    static let qemuArm64Images = environment["DEBUSINE_VIRT_TEST_ARM64_IMAGES"]
    static var canRunQemuArm64: Bool { (prefix != nil && qemuArm64Images != nil) || TestPaths.isCI }

    static func path() throws -> String {
        let prefix = try #require(prefix, "DEBUSINE_VIRT_INSTALL_PREFIX is not set: run through scripts/test")
        return "\(prefix)/bin:\(environment["PATH"] ?? "/usr/bin:/bin")"
    }
}
