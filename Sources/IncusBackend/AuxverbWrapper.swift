/// The program the auxverb runs in the instance, installed there by `open`, always through
/// debusine-virt-auxverb `--exec` (FramedExec) with `--framed` first.
///
/// `incus exec` resets the environment to its own defaults and waits until every process
/// holding the command's stdout or stderr has closed them, so a test that leaves a daemon
/// behind would hang the client forever. This wrapper gives the command the environment of a
/// root login, relays its output through pipes of its own and returns as soon as the command
/// has exited; background processes it left keep running but lose their output. Exit
/// statuses follow the auxverb contract: a real 255 becomes 253, death by signal N is 128+N.
///
/// Output and exit status travel as frames, and the process stays until its stdin ends,
/// because `incus exec` can lose the output of a command that ends right after writing it.
/// Perl (perl-base is essential in Debian) does the framing; it loads no modules (not even
/// POSIX, which alone costs more than the rest of a call): WNOHANG is Linux's 1, and the
/// child's failure paths can use plain exit because nothing has been buffered when it forks.
enum AuxverbWrapper {
    /// Where it lives in the instance: on the root filesystem, so it survives a reboot.
    static let path = "/var/lib/debusine-virt/auxverb"

    /// The program: Resources/auxverb-wrapper.sh.
    static let script = String(decoding: PackageResources.auxverb_wrapper_sh, as: UTF8.self)

    /// Installs the wrapper from stdin, executable by root only.
    static let installScript = String(decoding: PackageResources.install_auxverb_wrapper_sh, as: UTF8.self)
}
