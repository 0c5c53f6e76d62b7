// swift-tools-version: 6.1
import Foundation
import PackageDescription

// The benchmarks run on jemalloc where its development files are installed (Debian: libjemalloc-dev;
// `scripts/test.sh` installs them when it can). The runtime's threads hand buffers to one another —
// a turn's batch is built on a shard and freed after its commit — and glibc's malloc serves that
// poorly: jemalloc took 12–18% less CPU in `saga-transfer` and `entity-signals` (docs/PERFORMANCE.md).
// The library itself links no allocator; an application chooses its own (see the README's
// "Deployment"). `DURABLE_ENTITIES_MALLOC=system` builds the benchmarks on the system malloc
// (with `--manifest-cache none`, so that the manifest is read again).
let jemallocInstalled = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    .contains { FileManager.default.fileExists(atPath: "\($0)/libjemalloc.so") }
let benchmarksOnJemalloc = jemallocInstalled && ProcessInfo.processInfo.environment["DURABLE_ENTITIES_MALLOC"] != "system"

// Release builds of the benchmarks link the Swift runtime statically, as a server is usually deployed
// (`swift build -c release --static-swift-stdlib`): every retain, release and task switch is then a
// direct call instead of one through the dynamic linker's tables, and the concurrency runtime reads
// its thread-local state without `__tls_get_addr`. 12 side-by-side pairs of `saga-transfer`: −1.2 to
// −8.6% CPU a transfer, every pair lower, mean about −4.7% (docs/PERFORMANCE.md). The README's
// "Deployment" says how an application does the same. Linking only this target statically
// (the flag SwiftPM's option gives every compilation) needs Foundation's static libraries named:
// the modules were compiled against the shared Foundation, whose own dependencies are not
// recorded in them. Every report says how it was linked (`swift_runtime` in the JSON).
// `DURABLE_ENTITIES_STATIC_STDLIB=0` links it dynamically (with `--manifest-cache none`).
let benchmarksStaticStdlib = ProcessInfo.processInfo.environment["DURABLE_ENTITIES_STATIC_STDLIB"] != "0"
let staticFoundation = ["Foundation", "FoundationInternationalization", "FoundationEssentials", "CoreFoundation",
                        "_FoundationICU", "_FoundationCShims", "_FoundationCollections"]
let staticStdlibFlags = ["-static-stdlib", "-Xlinker", "--start-group"]
    + staticFoundation.flatMap { ["-Xlinker", "-l\($0)"] } + ["-Xlinker", "--end-group"]
let benchmarkLinkerSettings: [LinkerSetting] =
    (benchmarksOnJemalloc ? [.linkedLibrary("jemalloc", .when(platforms: [.linux]))] : [])
    + (benchmarksStaticStdlib ? [.unsafeFlags(staticStdlibFlags, .when(platforms: [.linux], configuration: .release))] : [])

let package = Package(
    name: "DurableEntities",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "DurableEntities", targets: ["DurableEntities"]),
        .library(name: "LMDB", targets: ["LMDB"]),
        .library(name: "DurableEntitiesTesting", targets: ["DurableEntitiesTesting"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.6.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.4.0"),
        // The samples' HTTP services. Its default traits (swift-configuration support, full
        // Foundation) are switched off: the samples need neither, and CI builds from scratch.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.20.0", traits: []),
        // Hummingbird builds on SwiftNIO already; named here for the samples' small HTTP client.
        .package(url: "https://github.com/apple/swift-nio", from: "2.81.0"),
    ],
    targets: [
        // C interop stays at the edge: one system-library target for Debian's liblmdb-dev.
        .systemLibrary(
            name: "CLMDB",
            pkgConfig: "lmdb",
            providers: [.apt(["liblmdb-dev"])]
        ),
        // The LMDB wrapper: every C call passes through it. Knows nothing of entities.
        .target(
            name: "LMDB",
            dependencies: ["CLMDB"]
        ),
        // The runtime. Starts with the journal and its group-committing writer.
        .target(
            name: "DurableEntities",
            dependencies: [
                "LMDB",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        // The test kit, shipped as a library product: test clock, history replayer, crash-and-reopen.
        .target(
            name: "DurableEntitiesTesting",
            dependencies: ["DurableEntities"]
        ),
        .executableTarget(
            name: "Benchmarks",
            dependencies: [
                "DurableEntities",
                "DurableEntitiesTesting",
                "TestSupport",
                "LMDB",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Benchmarks",
            linkerSettings: benchmarkLinkerSettings
        ),
        .executableTarget(
            name: "JournalDemo",
            dependencies: [
                "DurableEntities",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Samples/JournalDemo",
            exclude: ["README.md"]
        ),
        .executableTarget(
            name: "BankSample",
            dependencies: [
                "DurableEntities",
                "SampleHTTPClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Samples/Bank",
            exclude: ["README.md"]
        ),
        .executableTarget(
            name: "CartSample",
            dependencies: [
                "DurableEntities",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Samples/Cart",
            exclude: ["README.md"]
        ),
        // A small keep-alive HTTP/1.1 client on SwiftNIO: the samples' load generator and the
        // samples' tests use it (HummingbirdTesting would pull in AsyncHTTPClient and BoringSSL).
        .target(
            name: "SampleHTTPClient",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            path: "Samples/Support/SampleHTTPClient"
        ),
        // Child processes for crash tests: the tests SIGKILL them mid-stream and check the directory.
        .executableTarget(
            name: "EntityCrashChild",
            dependencies: ["DurableEntities", "TestSupport"],
            path: "Tests/Support/EntityCrashChild"
        ),
        .executableTarget(
            name: "JournalCrashChild",
            dependencies: ["DurableEntities", "TestSupport"],
            path: "Tests/Support/JournalCrashChild"
        ),
        // What both test targets share: child processes the tests start and SIGKILL.
        .target(
            name: "TestSupport",
            dependencies: ["DurableEntities"],
            path: "Tests/Support/TestSupport"
        ),
        .testTarget(
            name: "LMDBTests",
            dependencies: ["LMDB", "TestSupport"]
        ),
        .testTarget(
            name: "DurableEntitiesTests",
            dependencies: [
                "DurableEntities", "DurableEntitiesTesting", "LMDB", "TestSupport",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            // Golden histories, read by path (#filePath) rather than bundled.
            exclude: ["Histories"]
        ),
        // The samples' HTTP services, driven in-process over loopback.
        .testTarget(
            name: "BankSampleTests",
            dependencies: ["BankSample", "SampleHTTPClient", "DurableEntities", "DurableEntitiesTesting", "TestSupport"],
            exclude: ["Histories"]
        ),
        .testTarget(
            name: "CartSampleTests",
            dependencies: ["CartSample", "SampleHTTPClient", "DurableEntities", "DurableEntitiesTesting", "TestSupport"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
