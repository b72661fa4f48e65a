// swift-tools-version: 6.1
import PackageDescription

let argumentParser: Target.Dependency = .product(name: "ArgumentParser", package: "swift-argument-parser")

let package = Package(
    name: "debusine-virt",
    products: [
        .executable(name: "debusine-virt-qemu", targets: ["debusine-virt-qemu"]),
        .executable(name: "debusine-virt-incus", targets: ["debusine-virt-incus"]),
        .executable(name: "debusine-virt-auxverb", targets: ["debusine-virt-auxverb"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/swiftlang/swift-subprocess", from: "1.0.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // Errors, logging to stderr, timeouts, the C library: what every other module shares.
        .target(name: "VirtCore", dependencies: [.product(name: "SystemPackage", package: "swift-system")]),
        // Parsing requests and formatting replies of the virt-server protocol.
        .target(name: "VirtProtocol", dependencies: ["VirtCore"]),
        // External commands as argv values, run through one seam.
        .target(
            name: "CommandRunner",
            dependencies: [
                "VirtCore",
                .product(name: "Subprocess", package: "swift-subprocess"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // Reading and writing tar streams block by block: the rootfs rewrite of an import, and
        // the filter between a testbed's archive and the host's tar.
        .target(name: "TarFormat", dependencies: ["VirtCore"]),
        // The Testbed seam a backend implements, plus scratch, reboot and copy plumbing.
        .target(name: "TestbedCore", dependencies: ["VirtCore", "CommandRunner", "TarFormat"]),
        // The request loop over injected line input/output, stdio and signal handling.
        .target(
            name: "VirtSession",
            dependencies: [
                "VirtCore", "VirtProtocol", "TestbedCore", "CommandRunner",
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]
        ),
        // Async clients for QEMU's monitor (QMP) and guest agent (QGA) on unix sockets.
        .target(
            name: "QemuMonitor",
            dependencies: [
                "VirtCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // The frames the auxverb, the server and the guest helper exchange.
        .target(name: "GuestChannel"),
        // The auxverb: runs one command through the server's relay socket or through a runner
        // such as `incus exec` (plain threads).
        .target(
            name: "AuxverbClient",
            dependencies: ["VirtCore", "GuestChannel", .product(name: "SystemPackage", package: "swift-system")]),
        // The guest helper (the program that runs commands in the testbed) and the auxverb relay
        // that serves it to auxverb clients, over any byte stream: a VM's virtio-serial port, or
        // `incus exec`'s stdio.
        .target(
            name: "GuestHelper",
            dependencies: [
                "VirtCore", "GuestChannel",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            // Programs that run in the guest, kept as files so that they are linted as what they are.
            resources: [.embedInCode("Resources/guest-helper.py"), .embedInCode("Resources/guest-helper-launcher.sh")]
        ),
        // The QEMU backend: instance lifecycle, the guest helper's life in a VM, saved VM states.
        .target(
            name: "QemuBackend",
            dependencies: [
                "VirtCore", "CommandRunner", "TestbedCore", "GuestChannel", "GuestHelper", "QemuMonitor", "ImageCache",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // Images downloaded from URLs, and saved VM states, in a per-user cache shared by
        // concurrent servers.
        .target(name: "ImageCache", dependencies: ["VirtCore", "CommandRunner"]),
        // The Incus backend: setup, image import, instances through the incus CLI, gc.
        .target(
            name: "IncusBackend",
            dependencies: [
                "VirtCore", "CommandRunner", "TestbedCore", "ImageCache", "TarFormat", "GuestHelper",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            resources: [
                .embedInCode("Resources/auxverb-wrapper.sh"), .embedInCode("Resources/install-auxverb-wrapper.sh"),
                .embedInCode("Resources/container-generator.sh"),
            ]),
        // The client side: a virt server as a child process, driven over pipes as autopkgtest does.
        .target(name: "VirtClient", dependencies: ["VirtCore", "VirtProtocol", "CommandRunner"]),
        // A testbed that is a private directory on the host: drives the protocol tests.
        .target(name: "FixtureBackend", dependencies: ["VirtCore", "TestbedCore", "CommandRunner"]),

        .executableTarget(
            name: "debusine-virt-qemu",
            dependencies: [
                "VirtCore", "VirtSession", "TestbedCore", "QemuBackend", "ImageCache", "CommandRunner", argumentParser,
            ]
        ),
        .executableTarget(name: "debusine-virt-auxverb", dependencies: ["AuxverbClient", "GuestChannel"]),
        .executableTarget(
            name: "debusine-virt-incus",
            dependencies: ["VirtCore", "VirtSession", "TestbedCore", "CommandRunner", "IncusBackend", argumentParser]
        ),
        // The benchmark: times any virt server over the protocol and compares two of them.
        .target(
            name: "VirtBenchmark", dependencies: ["VirtCore", "VirtProtocol", "VirtClient", "CommandRunner"],
            path: "Benchmarks/VirtBenchmark"),
        .executableTarget(
            name: "virt-bench", dependencies: ["VirtBenchmark", "VirtCore", argumentParser],
            path: "Benchmarks/virt-bench"),
        .executableTarget(
            name: "virt-fixture-server",
            dependencies: ["VirtCore", "VirtSession", "FixtureBackend", argumentParser]
        ),

        // Drives servers through real pipes and replays transcripts, for the test targets.
        .target(
            name: "VirtTestSupport",
            dependencies: [
                "VirtCore", "VirtProtocol", "VirtSession", "TestbedCore", "FixtureBackend", "CommandRunner",
                "VirtClient",
            ],
            path: "Tests/VirtTestSupport"
        ),

        .testTarget(name: "VirtProtocolTests", dependencies: ["VirtProtocol", "VirtCore"]),
        .testTarget(
            name: "TarFormatTests", dependencies: ["TarFormat", "CommandRunner", "VirtCore", "VirtTestSupport"]),
        .testTarget(name: "CommandRunnerTests", dependencies: ["CommandRunner", "VirtCore"]),
        .testTarget(
            name: "VirtSessionTests",
            dependencies: [
                "VirtSession", "VirtProtocol", "TestbedCore", "FixtureBackend", "CommandRunner", "VirtCore",
                "VirtTestSupport",
            ]
        ),
        .testTarget(
            name: "QemuMonitorTests",
            dependencies: [
                "QemuMonitor", "VirtCore", "CommandRunner", "VirtTestSupport",
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]),
        .testTarget(
            name: "QemuBackendTests",
            dependencies: [
                "QemuBackend", "GuestChannel", "GuestHelper", "AuxverbClient", "CommandRunner", "VirtCore",
                "VirtTestSupport", "ImageCache", "TestbedCore",
            ], exclude: ["Fixtures"]
        ),
        .testTarget(
            name: "IncusBackendTests",
            dependencies: ["IncusBackend", "GuestHelper", "CommandRunner", "VirtCore", "VirtTestSupport", "TarFormat"],
            exclude: ["Fixtures"]
        ),
        // The real clients (sbuild, and autopkgtest through the installed names) over the servers.
        .testTarget(name: "ClientTests", dependencies: ["CommandRunner", "VirtCore", "VirtTestSupport"]),
        .testTarget(name: "TestImageTests", dependencies: ["CommandRunner", "VirtCore", "VirtTestSupport"]),
        // Faults, fuzzing, load and security against both real backends (issue 7).
        .testTarget(
            name: "FaultTests",
            dependencies: [
                "CommandRunner", "VirtCore", "VirtProtocol", "VirtTestSupport", "VirtBenchmark", "TarFormat",
            ]),
        .testTarget(
            name: "BenchmarkTests", dependencies: ["VirtBenchmark", "CommandRunner", "VirtCore", "VirtTestSupport"]),
        .testTarget(
            name: "ImageCacheTests", dependencies: ["ImageCache", "CommandRunner", "VirtCore", "VirtTestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
