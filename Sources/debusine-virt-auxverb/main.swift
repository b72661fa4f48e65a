import AuxverbClient

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

// debusine-virt-auxverb SOCKET COMMAND [ARG...]
//
// The program print-execute-command names: it runs for every command autopkgtest and sbuild
// send, so it is its own small executable without Foundation, NIO or ArgumentParser (the
// server binary takes ~75 ms just to load those).
let arguments = CommandLine.arguments
guard arguments.count >= 3 else {
    let usage = "usage: debusine-virt-auxverb SOCKET COMMAND [ARG...]\n"
    _ = usage.withCString { write(2, $0, strlen($0)) }
    exit(255)
}
exit(AuxverbClient.run(socketPath: arguments[1], argv: Array(arguments.dropFirst(2))))
