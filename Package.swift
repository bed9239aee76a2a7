// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "Weft",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "weft", targets: ["WeftCLI"]),
        // The dataflow engine as a library: a program registers its own
        // jobs and serves as the cluster's nodes (Examples/WordLengths).
        .library(name: "WeftDataflow", targets: ["WeftDataflow"]),
        .executable(name: "weft-example-wordlengths", targets: ["WordLengthsExample"]),
        .executable(name: "weft-bench", targets: ["WeftBench"]),
        .executable(name: "weft-dataflow-bench", targets: ["DataflowBench"]),
        .executable(name: "weft-fuzz", targets: ["WeftFuzz"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // Layer 0: C system library.
        .systemLibrary(name: "CLMDB", providers: [.apt(["liblmdb-dev"])]),
        // OpenSSL's libcrypto: HMAC-SHA256 and random bytes for the handshake.
        .systemLibrary(name: "CCrypto", providers: [.apt(["libssl-dev"])]),
        // TLS over memory buffers with the system's libssl (see TLS.swift).
        .target(name: "CWeftTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        // Layer 1: value types, limits, binary codec.
        .target(name: "WeftCore"),
        // Layer 2: pure protocol logic (no I/O, no clock, no async).
        .target(name: "WeftProtocol", dependencies: ["WeftCore"]),
        // Layer 2b: the deterministic simulator that drives the pure machines.
        .target(name: "WeftSimulation", dependencies: ["WeftCore", "WeftProtocol"]),
        // Layer 3: adapters.
        .target(name: "WeftLMDB", dependencies: ["CLMDB"]),
        // Layer 4: runtime shells (nodes, storage, embedded cluster, client).
        .target(name: "WeftRuntime", dependencies: [
            "WeftCore", "WeftProtocol", "WeftLMDB", "CCrypto", "CWeftTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // Layer 4b: the lineage dataflow engine (RDDs, scheduler, jobs).
        .target(name: "WeftDataflow", dependencies: ["WeftCore", "WeftProtocol", "WeftRuntime", .product(name: "Logging", package: "swift-log"),
                                                     .product(name: "CoreMetrics", package: "swift-metrics")]),
        // Layer 5: CLI (argument parsing only).
        .executableTarget(
            name: "WeftCLI",
            dependencies: ["WeftRuntime", "WeftCore", "WeftProtocol", "WeftDataflow", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")]
        ),
        .executableTarget(name: "WeftBench", dependencies: ["WeftRuntime", "WeftLMDB", "WeftCore", "WeftProtocol"], path: "Tools/WeftBench"),
        .testTarget(name: "WeftProtocolTests", dependencies: ["WeftProtocol", "WeftCore", "WeftSimulation"]),
        .executableTarget(name: "DataflowBench", dependencies: ["WeftDataflow", "WeftCore"], path: "Tools/DataflowBench"),
        .executableTarget(name: "WordLengthsExample", dependencies: ["WeftDataflow", "WeftCore"], path: "Examples/WordLengths"),
        .executableTarget(name: "WeftSim", dependencies: ["WeftSimulation"], path: "Tools/WeftSim"),
        // libFuzzer targets (`make fuzz`); the driver links weakly to libFuzzer.
        .target(name: "CFuzzDriver"),
        .executableTarget(name: "WeftFuzz", dependencies: ["CFuzzDriver", "WeftCore", "WeftProtocol", "WeftRuntime", "WeftDataflow",
                                                           .product(name: "NIOCore", package: "swift-nio")], path: "Tools/WeftFuzz"),
        .testTarget(name: "WeftLMDBTests", dependencies: ["WeftLMDB"]),
        .testTarget(name: "WeftDataflowTests", dependencies: ["WeftDataflow", "WeftCore", "WeftRuntime"]),
        .testTarget(name: "WeftRuntimeTests", dependencies: ["WeftRuntime", "WeftProtocol", "WeftCore", "WeftLMDB"]),
    ],
    swiftLanguageModes: [.v6]
)
