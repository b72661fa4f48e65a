import VirtCore

/// The guest side of the auxverb: a Python 3 program the server installs in the guest through
/// the guest agent and starts there. It runs commands for the host and streams their stdin,
/// stdout and stderr over a dedicated virtio-serial port, many commands at once, in the frame
/// format of the GuestChannel module.
///
/// Python because debusine's QEMU images are required to carry python3-minimal, and the
/// standard library is all it uses. `--listen PATH` serves one connection on a unix socket
/// instead of a port, so the tests run it on the host.
public enum GuestHelperScript {
    /// The start of the program's SHA-256: any change to it is a new version, so a helper left
    /// in a guest (a saved state's) by another version is recognised. The server passes it to
    /// the helper (`--version`), which announces it in its hello.
    public static let version = String(SHA256.hexDigest(of: PackageResources.guest_helper_py).prefix(16))

    /// The helper's argv after python3: its version and the port to serve.
    public static func arguments(port: String) -> [String] { [guestPath, "--version", version, port] }

    /// The argv after python3 that runs the helper on its stdin and stdout (`--stdio`) without
    /// a file in the testbed: a short loader reads the program's bytes (``source``, sent first
    /// on stdin) and runs it, so the testbed's process list shows a short command, not the
    /// program.
    public static var stdioArguments: [String] {
        ["-c", stdioLoader, String(source.utf8.count), "--version", version, "--stdio"]
    }

    public static let stdioLoader = """
        import os, sys
        size = int(sys.argv.pop(1))
        program = b''
        while len(program) < size:
            chunk = os.read(0, size - len(program))
            if not chunk:
                sys.exit('debusine-virt-helper: the program ended early on stdin')
            program += chunk
        exec(compile(program, 'debusine-virt-helper', 'exec'))
        """

    /// Where the server installs it in the guest (a tmpfs: gone after reboot, like the helper).
    public static let guestPath = "/run/debusine-virt-helper.py"

    /// Starts the helper (its argv follows) as a transient systemd service when the guest runs
    /// systemd, so that it lives outside qemu-guest-agent's cgroup: a test that restarts or
    /// upgrades the agent would otherwise kill the helper and every command it runs. Without
    /// systemd it runs as the agent's child, as before.
    public static let launcher = String(decoding: PackageResources.guest_helper_launcher_sh, as: UTF8.self)

    /// The virtio-serial port name it talks over.
    public static let portName = "org.debusine.virt.0"

    /// The program: Resources/guest-helper.py, as it is in the source tree.
    public static let source = String(decoding: PackageResources.guest_helper_py, as: UTF8.self)
}
