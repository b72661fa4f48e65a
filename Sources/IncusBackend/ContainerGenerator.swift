/// The systemd generator the import installs as /etc/systemd/system-generators/lxc.
///
/// A Debian system booted in an (unprivileged) Incus container meets a read-only /sys, no
/// kernel module loading, no hugepages, no audit, and sandboxing options its units cannot set
/// up. This generator runs at every boot, before any unit starts, and only in an LXC
/// container; it writes to the generator directory ($1), never to /etc, so the image stays as
/// it was outside containers (a VM booting the same root file system is untouched):
/// - relaxes the service sandboxing options that need kernel features a container lacks
///   (per systemd version, from `systemctl --version`);
/// - masks units that can only fail in a container;
/// - lets udev triggering and sysctl fail without failing the boot;
/// - gives systemd-networkd and systemd-resolved a read-only /sys, which they accept, in
///   unprivileged containers.
/// It was written for debusine-virt from what such boots show; it is not distrobuilder's.
enum ContainerGenerator {
    static let path = "etc/systemd/system-generators/lxc"

    /// The program: Resources/container-generator.sh.
    static let script = String(decoding: PackageResources.container_generator_sh, as: UTF8.self)
}
