import ImageCache
import TestbedCore
import VirtCore

/// What every open of a testbed would otherwise ask the guest, found once before its state is
/// saved and kept in the entry (under its manifest): the normal user and a scratch directory
/// made then, which every guest restored from the state has. Under TCG the first commands after
/// a restore run on an empty translation cache and took 0.3-0.45 s of a 0.8-0.9 s open here.
struct GuestFacts: Sendable, Equatable {
    static let fileName = "guest.txt"

    /// The account for `suggested-normal-user=`, nil when the guest has none.
    var normalUser: String?
    /// The directory ``ScratchDirectory/make(in:mode:)`` made in the guest.
    var scratch: String

    /// Asks the guest; nil when it could not tell (then nothing is recorded and every open asks).
    static func gather(from testbed: InTestbed, capabilities: [String]) async -> GuestFacts? {
        do throws(VirtError) {
            let user = try await testbed.run(NormalUser.argv)
            guard user.status.succeeded else { return nil }
            let scratch = try await ScratchDirectory.make(in: testbed, mode: ScratchDirectory.mode(capabilities))
            return GuestFacts(normalUser: NormalUser.parse(user), scratch: scratch)
        } catch {
            log.debug("the guest's normal user or scratch directory: \(error.message)")
            return nil
        }
    }

    var text: String {
        "scratch \(scratch)\n" + (normalUser.map { "normal-user \($0)\n" } ?? "")
    }

    /// The facts in `text`; nil unless every line is one of ``text``'s and holds what is
    /// allowed there (the guest wrote the values).
    static func parse(_ text: String) -> GuestFacts? {
        var scratch: String?
        var user: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) where !line.isEmpty {
            guard let space = line.firstIndex(of: " ") else { return nil }
            let value = String(line[line.index(after: space)...])
            switch line[..<space] {
            case "scratch" where scratch == nil && ScratchDirectory.isPlausible(value): scratch = value
            case "normal-user" where user == nil && NormalUser.isPlainUserName(value): user = value
            default: return nil
            }
        }
        guard let scratch else { return nil }
        return GuestFacts(normalUser: user, scratch: scratch)
    }

    /// The facts `entry` holds; nil when it has none (saved before they were kept) or the file
    /// is not the one its manifest lists: another server may have discarded and saved the entry
    /// again since it was verified, with another guest's scratch directory.
    static func read(from entry: StateStore.Entry) -> GuestFacts? {
        guard let digest = entry.digests[fileName], let text = SmallFile.text(entry.file(fileName), limit: 4096),
            SHA256.hexDigest(of: Array(text.utf8)) == digest
        else { return nil }
        return parse(text)
    }
}
