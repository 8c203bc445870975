// swift-tools-version: 6.1
import PackageDescription

/// Set by `scripts/fuzz.sh`: adds the libFuzzer targets in `Fuzz/` (docs/fuzzing.md) and keeps
/// Swift's runtime checks in every module, so a broken invariant shows as a crash.
let fuzzing = Context.environment["HOSTVISOR_FUZZ"] != nil

/// The interpreter's hot loop is compiled with the strongest settings that stay correct:
/// whole-module optimization, no exclusivity checking (the CPU owns its state on one thread),
/// and no overflow traps (all guest arithmetic uses explicit wrapping operators).
let interpreterSettings: [SwiftSetting] =
  fuzzing
  ? []
  : [.unsafeFlags(["-Ounchecked", "-wmo", "-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
  name: "Hostvisor",
  platforms: [.macOS(.v15)],
  products: [
    .executable(name: "hostvisor", targets: ["hostvisor"]),
    .library(name: "VMM", targets: ["VMM"]),
    .library(name: "ControlAPI", targets: ["ControlAPI"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
    .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
  ],
  targets: [
    .target(name: "CShim"),
    .target(name: "CSandbox"),
    .target(name: "Sandbox", dependencies: ["CSandbox", "VMCore"]),
    .target(name: "CSoftFloat"),
    .target(name: "CNativeExec", path: "Tests/CNativeExec"),
    .target(name: "VMCore", dependencies: ["CShim"]),
    .target(name: "KVMBackend", dependencies: ["VMCore", "CShim", "PCI"]),
    .target(
      name: "SoftCPU", dependencies: ["VMCore", "CShim", "CSoftFloat", "InterruptControllers"],
      swiftSettings: interpreterSettings),
    .target(name: "Devices", dependencies: ["VMCore", "CShim"]),
    .target(name: "Loaders", dependencies: ["VMCore"]),
    .target(name: "InterruptControllers", dependencies: ["VMCore", "PCI"]),
    .target(name: "Firmware", dependencies: ["VMCore"]),
    .target(name: "PCI", dependencies: ["VMCore"]),
    .target(name: "CVirtioShim"),
    .systemLibrary(name: "CZlib"),
    .target(name: "Display", dependencies: ["VMCore", "PCI", "CZlib"]),
    .target(name: "GDBStub", dependencies: ["VMCore", "SoftCPU", "KVMBackend"]),
    .target(name: "Virtio", dependencies: ["VMCore", "PCI", "CVirtioShim", "CShim", "Devices"]),
    .target(
      name: "VMM",
      dependencies: [
        "VMCore", "KVMBackend", "SoftCPU", "Devices", "Loaders", "InterruptControllers", "Firmware", "CShim",
        "PCI", "Virtio", "GDBStub", "Display",
      ]),
    .target(
      name: "ControlAPI",
      dependencies: [
        "VMM", "VMCore", "KVMBackend", "Virtio", "Devices",
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOPosix", package: "swift-nio"),
        .product(name: "NIOHTTP1", package: "swift-nio"),
        .product(name: "Logging", package: "swift-log"),
      ]),
    .executableTarget(
      name: "hostvisor",
      dependencies: [
        "VMM", "ControlAPI", "Sandbox", "Devices", "Virtio",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ]
    ),
    .executableTarget(name: "hostvisor-bench", dependencies: ["KVMBackend", "VMCore"]),
    .executableTarget(name: "hostvisor-softbench", dependencies: ["SoftCPU", "VMCore"]),
    .target(name: "TestSupport", dependencies: ["CShim"], path: "Tests/TestSupport"),
    .testTarget(name: "TestSupportTests", dependencies: ["TestSupport"]),
    .testTarget(name: "VMCoreTests", dependencies: ["VMCore", "TestSupport"]),
    .testTarget(name: "KVMBackendTests", dependencies: ["KVMBackend", "VMCore", "Devices", "Loaders", "TestSupport"]),
    .testTarget(name: "LoaderTests", dependencies: ["Loaders", "VMCore", "TestSupport"]),
    .executableTarget(name: "DeviceTestHelper", dependencies: ["Devices"], path: "Tests/DeviceTestHelper"),
    .testTarget(name: "DeviceTests", dependencies: ["Devices", "VMCore", "DeviceTestHelper", "TestSupport"]),
    .testTarget(
      name: "SoftCPUTests",
      dependencies: [
        "SoftCPU", "VMCore", "CNativeExec", "CShim", "InterruptControllers", "Loaders", "Devices", "KVMBackend",
        "TestSupport",
      ]),
    .testTarget(name: "CLITests", dependencies: ["VMM", "Sandbox", "TestSupport"]),
    .testTarget(name: "GDBStubTests", dependencies: ["GDBStub", "VMCore", "hostvisor", "TestSupport"]),
    .testTarget(name: "LinuxBootTests", dependencies: ["hostvisor", "TestSupport"]),
    .testTarget(name: "ControlAPITests", dependencies: ["ControlAPI", "VMM", "hostvisor", "TestSupport"]),
    .testTarget(name: "InterruptControllerTests", dependencies: ["InterruptControllers", "VMCore"]),
    .testTarget(name: "FirmwareTests", dependencies: ["Firmware", "VMCore", "TestSupport"]),
    .testTarget(
      name: "DisplayTests", dependencies: ["Display", "Devices", "VMCore", "PCI", "hostvisor", "TestSupport"]),
    .testTarget(
      name: "VirtioTests",
      dependencies: ["Virtio", "PCI", "VMCore", "CVirtioShim", "SoftCPU", "Devices", "TestSupport"]),
  ],
  swiftLanguageModes: [.v6]
)

/// The fuzz targets: one executable per attack surface, linked with libFuzzer (its `main` is
/// the target's `@main`, which hands the input callback to `LLVMFuzzerRunDriver`).
if fuzzing {
  let linkWithLLD: [LinkerSetting] = [.unsafeFlags(["-use-ld=lld"])]
  package.targets += [
    .target(name: "CFuzzerDriver", path: "Fuzz/CFuzzerDriver"),
    .target(name: "FuzzSupport", dependencies: ["CFuzzerDriver", "VMCore"], path: "Fuzz/FuzzSupport"),
    .executableTarget(
      name: "fuzz-softcpu", dependencies: ["FuzzSupport", "SoftCPU", "VMCore"], path: "Fuzz/softcpu",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-virtio", dependencies: ["FuzzSupport", "Virtio", "Devices", "PCI", "VMCore"], path: "Fuzz/virtio",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-nics", dependencies: ["FuzzSupport", "Virtio", "VMCore"], path: "Fuzz/nics",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-loaders", dependencies: ["FuzzSupport", "Loaders", "VMCore"], path: "Fuzz/loaders",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-migration", dependencies: ["FuzzSupport", "VMM", "Virtio", "VMCore"], path: "Fuzz/migration",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-vnc", dependencies: ["FuzzSupport", "Display", "VMCore"], path: "Fuzz/vnc",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-gdb", dependencies: ["FuzzSupport", "GDBStub", "SoftCPU", "VMCore"], path: "Fuzz/gdb",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-memfiles", dependencies: ["FuzzSupport", "VMM", "VMCore"], path: "Fuzz/memfiles",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-state", dependencies: ["FuzzSupport", "VMM", "Virtio", "VMCore"], path: "Fuzz/state",
      linkerSettings: linkWithLLD),
    .executableTarget(
      name: "fuzz-api",
      dependencies: [
        "FuzzSupport", "ControlAPI", "VMM",
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOEmbedded", package: "swift-nio"),
        .product(name: "NIOHTTP1", package: "swift-nio"),
      ],
      path: "Fuzz/api", linkerSettings: linkWithLLD),
  ]
}
