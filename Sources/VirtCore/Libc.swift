/// The C library, for every module that imports VirtCore: the servers run on Linux (glibc) only,
/// so this is the one place that says so.
///
/// The auxverb's modules (GuestChannel, AuxverbClient, debusine-virt-auxverb) stay free of
/// VirtCore to keep that binary small; those that need the C library import Glibc themselves.
@_exported import Glibc
