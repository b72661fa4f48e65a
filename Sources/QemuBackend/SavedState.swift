import CommandRunner
import Foundation
import GuestHelper
import ImageCache
import QemuMonitor
import VirtCore

/// What a saved VM state is valid for, written out so that its digest is the state's key in the
/// ``StateStore``: a state restores only into exactly the VM that saved it.
///
/// Files are named by identity (real path, device, inode, size, modification and change times),
/// not by content digest: hashing a multi-GiB image at every `open` would cost more than the
/// restore saves. An image changed in place gets a new change time even when its modification
/// time is set back (`touch -r`, `cp -p`, `tar` keep or restore it; the change time no one sets).
enum SavedStateKey {
    /// Bumped whenever what is saved, or how it is restored, changes. 3: saved once the guest's
    /// start-up has finished (``QemuTestbed``'s settle).
    static let format = 3

    /// The files an entry holds besides the manifest.
    /// The devices' state (QEMU's migration stream without the RAM).
    static let stateFile = "vmstate"
    /// The guest's RAM, a sparse file mapped by restored VMs.
    static let ramFile = "ram"
    static let diskFile = "disk.qcow2"
    static let efiVarsFile = "efivars.fd"
    static let descriptionFile = "key.txt"

    /// Everything that must match: the format, QEMU's version, the whole QEMU command line
    /// (machine, CPU model, RAM, CPUs, devices, accelerator, network, extra arguments; with a
    /// placeholder for the instance directory), the image, the firmware and the guest helper.
    static func description(options: QemuOptions, kvm: Bool, qemuVersion: String) -> String {
        let template = QemuCommands.qemu(
            options, InstancePaths(directory: "/INSTANCE"), kvm: kvm,
            memory: memory(qemuVersion: qemuVersion, InstancePaths(directory: "/INSTANCE")))
        // Extra disks are in the guest's page cache of a saved state: a changed one must not
        // meet a state that read the old one. (None: the same lines as before they existed.)
        let extraImages = options.extraImages.map { "extra image: \(identity($0.path))" }
        // (EFI: the same lines as before BIOS boots existed, so saved states stay valid.)
        let firmware =
            switch options.firmware {
            case .efi: ["efi code: \(identity(options.efiCode))", "efi vars: \(identity(options.efiVars))"]
            case .bios: ["bios: \(identity(QemuOptions.seaBIOS))"]
            }
        return
            ([
                "debusine-virt saved state format \(format)",
                "qemu: \(qemuVersion)",
                "argv: \(template.argv.joined(separator: " "))",
                "image: \(identity(options.image, times: !options.imageIsCached))",
            ] + extraImages + firmware + [
                "guest helper: \(GuestHelperScript.version)"
            ]).joined(separator: "\n") + "\n"
    }

    /// The RAM of a VM whose state is saved: a file, which restored VMs map instead of reading
    /// the RAM from the state, when QEMU can map a file private and writable while opening it
    /// read-only (`rom=off`, QEMU 8.2); before that, anonymous memory saved in the stream.
    static func memory(qemuVersion: String, _ paths: InstancePaths) -> GuestMemory {
        // "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
        let words = qemuVersion.split(separator: " ")
        guard let index = words.firstIndex(of: "version"), index + 1 < words.count else { return .anonymous }
        let numbers = words[index + 1].split(separator: ".").prefix(2).map { Int($0) ?? 0 }
        guard numbers.count == 2 else { return .anonymous }
        return (numbers[0], numbers[1]) >= (8, 2) ? .savable(file: paths.ram) : .anonymous
    }

    /// The first line of `QEMU --version`.
    static func qemuVersion(_ qemu: String, runner: any CommandRunner) async throws(VirtError) -> String {
        let result = try await runner.run(Command(qemu, ["--version"]), input: .none, output: .capture, error: .discard)
        guard result.status.succeeded, let line = result.outputText.split(separator: "\n").first else {
            throw VirtError(.unavailable, "\(qemu) --version failed")
        }
        return String(line)
    }

    /// Without `times` (a cached download, whose times change with every use), the file is
    /// known by its path, inode and size: a new download is a new file.
    static func identity(_ path: String, times: Bool = true) -> String {
        let real = AbsolutePath.real(path)
        var info = stat()
        guard stat(real, &info) == 0 else { return "\(real) missing" }
        guard times else { return "\(real) dev \(info.st_dev) ino \(info.st_ino) size \(info.st_size)" }
        return
            "\(real) dev \(info.st_dev) ino \(info.st_ino) size \(info.st_size) mtime \(CacheFiles.modificationTime(info)) "
            + "ctime \(Int64(info.st_ctim.tv_sec) * 1_000_000_000 + Int64(info.st_ctim.tv_nsec))"
    }
}

extension QemuInstance {
    /// Saves the running VM into `builder`'s directory: its devices' state (QMP migration, with
    /// the VM paused, leaving out the RAM), the RAM file and the overlay holding the disk's state
    /// at that instant, and the EFI variables. The VM then runs on as before.
    ///
    /// Returns what went wrong with saving, if anything (the VM is fine then, only the state is
    /// not saved); throws when the VM cannot be resumed.
    func saveState(into builder: StateStore.Builder) async throws(VirtError) -> VirtError? {
        guard let qmp = handles.withLock({ $0.qmp }) else {
            throw VirtError(.testbedFailure, "the testbed is not running")
        }
        var problem: VirtError?
        do throws(VirtError) {
            unlink(paths.stateOut)
            guard symlink("\(builder.path)/\(SavedStateKey.stateFile)", paths.stateOut) == 0 else {
                throw VirtError(.io, "cannot link \(paths.stateOut)", errno: errno)
            }
            let memory = handles.withLock { $0.memory }
            if case .savable = memory {
                try await qmp.execute("migrate-set-capabilities", arguments: QMP.MigrationCapabilities.ignoreShared)
            }
            try await qmp.execute("stop")
            try await qmp.execute("migrate", arguments: QMP.MigrationTarget(uri: QemuCommands.saveURI))
            try await waitForMigration(qmp, timeout: .seconds(600))
            // Stopped, the guest changes neither its RAM nor its disk: migration flushed the disk
            // and stopped using it, so the overlay is the disk's state.
            if case .savable(let ram) = memory {
                try await runner.check(
                    Command("cp", ["--sparse=always", "--", ram, "\(builder.path)/\(SavedStateKey.ramFile)"]))
            }
            try await runner.check(
                Command("cp", ["--sparse=always", "--", paths.overlay, "\(builder.path)/\(SavedStateKey.diskFile)"]))
            if options.firmware == .efi {
                try await runner.check(
                    Command("cp", ["--", paths.efiVars, "\(builder.path)/\(SavedStateKey.efiVarsFile)"]))
            }
        } catch {
            problem = error
        }
        unlink(paths.stateOut)
        if problem != nil {
            // A migration in progress must end before the VM may run again.
            _ = try? await qmp.execute("migrate_cancel", timeout: .seconds(10))
        }
        let status = try await qmp.execute("query-status", returning: QMP.StatusInfo.self, timeout: .seconds(30))
        if !status.running {
            try await qmp.execute("cont", timeout: .seconds(30))
        }
        return problem
    }

    /// Waits for the outgoing migration to complete; its failure or QEMU's end is an error.
    private func waitForMigration(_ qmp: QMPClient, timeout: Duration) async throws(VirtError) {
        let completed = try await Deadline(after: timeout).poll(every: .milliseconds(50)) {
            () throws(VirtError) -> Bool in
            try checkAlive("while saving the VM state")
            let info = try await qmp.execute("query-migrate", returning: QMP.MigrationInfo.self)
            switch info.status {
            case "completed": return true
            case "failed", "cancelled":
                throw VirtError(
                    .testbedFailure, "saving the VM state failed: \(info.errorDescription ?? "no reason given")")
            default: return false
            }
        }
        guard completed else {
            if Task.isCancelled { throw VirtError(.timeout, "saving the VM state was cancelled") }
            throw VirtError(.timeout, "saving the VM state took more than \(timeout.formattedSeconds)")
        }
    }

    /// Starts QEMU from a saved state on a fresh overlay over the saved disk, instead of booting.
    ///
    /// `verification` is the check of the entry's files, started by the caller beforehand so that
    /// it runs while QEMU starts; nothing is loaded unless it passed. Each host-side socket is
    /// connected before the state is loaded, as it was when the state was saved: a port found
    /// closed would close in the guest too. After the load the guest helper gets the host's
    /// clock and fresh entropy, and must answer with a hello saying what it did (returned).
    @discardableResult
    func restore(
        kvm: Bool, from entry: StateStore.Entry, verification: Task<VirtError?, Never>
    ) async throws(VirtError) -> String {
        let deadline = ContinuousClock.now + options.bootTimeout
        try await runner.check(
            QemuCommands.createOverlay(
                base: entry.file(SavedStateKey.diskFile), format: .qcow2, overlay: paths.overlay))
        if options.firmware == .efi {
            try await runner.check(Command("cp", ["--", entry.file(SavedStateKey.efiVarsFile), paths.efiVars]))
        }
        unlink(paths.stateIn)
        guard symlink(entry.file(SavedStateKey.stateFile), paths.stateIn) == 0 else {
            throw VirtError(.io, "cannot link \(paths.stateIn)", errno: errno)
        }
        defer { unlink(paths.stateIn) }
        // The entry says how it was saved: with its RAM as a file of its own, or in the stream.
        let mapped = entry.digests[SavedStateKey.ramFile] != nil
        let memory = mapped ? GuestMemory.restored(file: entry.file(SavedStateKey.ramFile)) : .anonymous
        let (qmp, _) = try await start(kvm: kvm, memory: memory, incoming: true)
        try await relay.waitUntilConnected(timeout: .seconds(30))
        // From here on a failure is the saved state's: it does not verify, load or run. What
        // failed before (a full disk, QEMU not starting) says nothing about the state.
        do throws(VirtError) {
            if let failure = await verification.value { throw failure }
            if mapped {
                try await qmp.execute("migrate-set-capabilities", arguments: QMP.MigrationCapabilities.ignoreShared)
            }
            try await qmp.execute("migrate-incoming", arguments: QMP.MigrationTarget(uri: QemuCommands.restoreURI))
            let loaded = try await Deadline(deadline).poll(every: .milliseconds(20)) { () throws(VirtError) -> Bool in
                try checkAlive("while loading the saved state")
                return try await qmp.execute("query-status", returning: QMP.StatusInfo.self).status != "inmigrate"
            }
            guard loaded else {
                if Task.isCancelled { throw VirtError(.timeout, "loading the saved state was cancelled") }
                throw VirtError(
                    .timeout, "loading the saved state took more than \(options.bootTimeout.formattedSeconds)")
            }
            let migration = try await qmp.execute("query-migrate", returning: QMP.MigrationInfo.self)
            if let status = migration.status, status != "completed" {
                throw VirtError(
                    .testbedFailure,
                    "loading the saved state failed (\(status)): \(migration.errorDescription ?? "no reason given")")
            }
            try await qmp.execute("cont")
            var payload = withUnsafeBytes(of: UInt64(Date().timeIntervalSince1970 * 1e9).bigEndian) { Array($0) }
            var generator = SystemRandomNumberGenerator()
            payload += (0..<64).map { _ in UInt8.random(in: 0...255, using: &generator) }
            try await relay.announceResume(payload)
            do {
                // Generous: four VMs restoring at once on two cores are slow to run even this.
                _ = try await relay.waitForHelper(notBootID: nil, timeout: .seconds(120))
            } catch {
                try checkAlive("after loading the saved state")
                throw VirtError(
                    .testbedFailure,
                    "the guest helper did not answer after the restore: \(error.message)\(consoleTail())")
            }
        } catch {
            if !isDestroyed { handles.withLock { $0.savedStateFailed = true } }
            throw error
        }
        let status = await relay.helperStatus
        // Both are what makes a restored guest a machine of its own; a guest kernel without them
        // still works, so it is a warning, not a failed restore.
        if !status.split(separator: " ").contains("clock-set") || !status.split(separator: " ").contains("reseeded") {
            log.warning("the restored guest's clock or random generator may be the saved one's: \(status)")
        }
        return status
    }
}
