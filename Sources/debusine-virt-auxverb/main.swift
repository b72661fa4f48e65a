import AuxverbClient
import Glibc
import GuestChannel

// debusine-virt-auxverb [--terminal ROWSxCOLUMNS] SOCKET COMMAND [ARG...]
// debusine-virt-auxverb --exec COUNT RUNNER... COMMAND [ARG...]
// debusine-virt-auxverb --read-file SOCKET PATH
//
// --terminal runs the command on a pseudo-terminal in the testbed (the server's `shell`).
// --read-file writes one file of the testbed to stdout, sent by the guest helper itself (the
// server's copyup); status 3 says root may execute it.
//
// The program print-execute-command names: it runs for every command autopkgtest and sbuild
// send, so it is its own small executable without Foundation, NIO or ArgumentParser (the
// server binary takes ~75 ms just to load those).

/// Output arrives in reads of up to 1 MiB and is copied into a new array per frame. With glibc's
/// defaults each such array is an mmap and munmap of its own, its pages faulted in every time:
/// 256 MiB of frames took 0.42 s, 0.16 s with these (Glibc's Swift module lacks mallopt).
func keepLargeAllocationsOnTheHeap() {
    typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
    let mallopt = unsafeBitCast(symbol, to: Mallopt.self)
    let mmapThreshold: Int32 = -3
    let trimThreshold: Int32 = -1
    _ = mallopt(mmapThreshold, 4 << 20)
    _ = mallopt(trimThreshold, 64 << 20)
}

keepLargeAllocationsOnTheHeap()
var arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "--exec" {
    // --exec COUNT RUNNER... COMMAND...: the first COUNT words run the wrapper in framed mode.
    guard arguments.count >= 2, let count = Int(arguments[1]), count > 0, arguments.count > 2 + count else {
        let usage = "usage: debusine-virt-auxverb --exec COUNT RUNNER... COMMAND [ARG...]\n"
        _ = usage.withCString { write(2, $0, strlen($0)) }
        exit(255)
    }
    let words = arguments.dropFirst(2)
    exit(FramedExec.run(runner: Array(words.prefix(count)), command: Array(words.dropFirst(count))))
}
if arguments.first == "--read-file" {
    guard arguments.count == 3 else {
        let usage = "usage: debusine-virt-auxverb --read-file SOCKET PATH\n"
        _ = usage.withCString { write(2, $0, strlen($0)) }
        exit(255)
    }
    exit(AuxverbClient.readFile(socketPath: arguments[1], path: arguments[2]))
}
var terminal: Frame.TerminalSize?
var usable = true
if arguments.first == "--terminal" {
    terminal = arguments.count >= 2 ? Frame.TerminalSize(arguments[1]) : nil
    usable = terminal != nil
    arguments.removeFirst(min(2, arguments.count))
}
guard usable, arguments.count >= 2 else {
    let usage = "usage: debusine-virt-auxverb [--terminal ROWSxCOLUMNS] SOCKET COMMAND [ARG...]\n"
    _ = usage.withCString { write(2, $0, strlen($0)) }
    exit(255)
}
exit(AuxverbClient.run(socketPath: arguments[0], argv: Array(arguments.dropFirst()), terminal: terminal))
