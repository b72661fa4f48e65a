import QemuMonitor
import VirtCore

/// `--baseimage`: the base image, read-only, in the guest as /dev/baseimage, as
/// autopkgtest-virt-qemu provides it (for tests that boot nested VMs from the same image).
///
/// As there, the disk is hot-plugged once the guest runs and unplugged before each reboot: its
/// partitions carry the same UUIDs as the boot disk's, and a boot that sees both may mount the
/// wrong one. The same udev rules give it the name and keep its partitions' UUIDs out of
/// /dev/disk/by-uuid. Saved VM states never contain it: they are saved before it is plugged.
enum BaseImage {
    /// autopkgtest-virt-qemu's rules (61-baseimage.rules), with link_priority -1024 so that the
    /// duplicate UUIDs of the partitions have no effect.
    static let udevRules = """
        # Created by debusine-virt-qemu (--baseimage)
        KERNEL=="vd*[!0-9]", ENV{ID_SERIAL}=="BASEIMAGE", OPTIONS+="link_priority=-1024", SYMLINK+="baseimage", MODE="0664"
        KERNEL=="vd*[0-9]",  ENV{ID_SERIAL}=="BASEIMAGE", OPTIONS+="link_priority=-1024"
        KERNEL=="vd*", ENV{ID_SERIAL}=="BASEIMAGE", ENV{ID_FS_TYPE}:="", ENV{ID_FS_USAGE}:="", ENV{ID_FS_UUID}:=""

        """

    /// Installs the rules ($1) in the guest and makes udev read them (it rereads rules only every
    /// few seconds by itself).
    static let rulesScript = """
        mkdir -p -m 0755 /run/udev/rules.d
        printf '%s' "$1" > /run/udev/rules.d/61-baseimage.rules
        udevadm control --reload
        """

    /// Waits up to 30 s for /dev/baseimage: the guest sees the hot-plugged disk a moment after
    /// QEMU added it, so a single `udevadm settle` can return before its events exist.
    static let waitScript = """
        i=0
        until [ -b /dev/baseimage ]; do
            i=$((i + 1))
            if [ $i -gt 300 ]; then exit 1; fi
            udevadm settle --timeout=1 --exit-if-exists=/dev/baseimage || true
            [ -b /dev/baseimage ] || sleep 0.1
        done
        """

    /// QMP `blockdev-add` of `image`, read-only, under ``QemuCommands/baseImageNode``. A qcow2
    /// is opened with its backing cut (`"backing": null`): the image was inspected at start-up,
    /// and a file changed since then must not get to name a host file for the guest to read.
    struct BlockdevAdd: Encodable, Sendable {
        let image: AttachedImage

        private enum Keys: String, CodingKey {
            case driver, file, backing
            case nodeName = "node-name"
            case readOnly = "read-only"
            case filename
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: Keys.self)
            try container.encode(image.format.rawValue, forKey: .driver)
            try container.encode(QemuCommands.baseImageNode, forKey: .nodeName)
            try container.encode(true, forKey: .readOnly)
            var file = container.nestedContainer(keyedBy: Keys.self, forKey: .file)
            try file.encode("file", forKey: .driver)
            try file.encode(image.path, forKey: .filename)
            try file.encode(true, forKey: .readOnly)
            if image.format == .qcow2 { try container.encodeNil(forKey: .backing) }
        }
    }

    /// QMP `device_add` of the disk with serial BASEIMAGE, into the root port made for it.
    struct DeviceAdd: Encodable, Sendable {
        var driver = "virtio-blk-pci"
        var id = QemuCommands.baseImageDeviceID
        var drive = QemuCommands.baseImageNode
        var serial = "BASEIMAGE"
        var bus = QemuCommands.baseImagePortID
    }
}

extension QemuInstance {
    /// Plugs the base image into the running guest (making its block node the first time).
    func plugBaseImage() async throws(VirtError) {
        guard let qmp = handles.withLock({ $0.qmp }) else {
            throw VirtError(.testbedFailure, "the testbed is not running")
        }
        if !handles.withLock({ $0.baseImageNode }) {
            let image = AttachedImage(path: options.image, format: options.imageFormat)
            try await qmp.execute("blockdev-add", arguments: BaseImage.BlockdevAdd(image: image))
            handles.withLock { $0.baseImageNode = true }
        }
        // The unplug before a reboot may not have finished (a guest that rebooted before
        // letting the disk go): the device is then still there, and plugged already.
        if await pluggedDevices(qmp).contains(QemuCommands.baseImageDeviceID) {
            log.debug("the base image is still plugged from before the reboot")
            return
        }
        try await qmp.execute("device_add", arguments: BaseImage.DeviceAdd())
    }

    /// The ids of the devices given on the command line or plugged since.
    private func pluggedDevices(_ qmp: QMPClient) async -> [String] {
        let children = try? await qmp.execute(
            "qom-list", arguments: QMP.ObjectPath(path: "/machine/peripheral"), returning: [QMP.ObjectProperty].self)
        return children?.map(\.name) ?? []
    }

    /// Unplugs the base image before a reboot and waits until the guest has let it go (the
    /// guest's part of the unplug takes a moment). A guest that does not let go within 30 s only
    /// gets a warning: the reboot may still work.
    func unplugBaseImage() async {
        guard let qmp = handles.withLock({ $0.qmp }) else { return }
        do {
            try await qmp.execute("device_del", arguments: QMP.DeviceID(id: QemuCommands.baseImageDeviceID))
        } catch {
            log.debug("device_del of the base image: \(error.message)")
            return
        }
        let released = await Deadline(after: .seconds(30)).poll(every: .milliseconds(100)) {
            !(await pluggedDevices(qmp)).contains(QemuCommands.baseImageDeviceID)
        }
        if released { return }
        log.warning("the guest did not release /dev/baseimage within 30 s before the reboot")
    }
}
