import Foundation
import TestSupport

/// Assembles the guest programs in Tests/GuestPrograms/kvm with the host's GNU as and ld
/// into flat binaries, in a fresh temporary directory per call.
enum GuestAssembler {
  struct Failure: Error, CustomStringConvertible {
    let description: String
  }

  /// Tests/GuestPrograms/kvm, found relative to this source file.
  static let sourceDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent()
    .deletingLastPathComponent()
    .appendingPathComponent("GuestPrograms/kvm")

  /// The flat binary of `name`.S linked at `linkAddress`.
  static func assemble(_ name: String, linkAddress: UInt64) throws -> [UInt8] {
    let source = sourceDirectory.appendingPathComponent("\(name).S")
    guard FileManager.default.fileExists(atPath: source.path) else {
      throw Failure(description: "guest program \(source.path) is missing")
    }
    let workDirectory = FileManager.default.temporaryDirectory
      .appendingPathComponent("hostvisor-kvm-guest-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: workDirectory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: workDirectory) }
    let object = workDirectory.appendingPathComponent("\(name).o").path
    let binary = workDirectory.appendingPathComponent("\(name).bin").path
    try runTool("/usr/bin/as", ["--64", "-o", object, source.path])
    try runTool(
      "/usr/bin/ld",
      [
        "-m", "elf_x86_64", "-nostdlib", "-N", "-e", "_start", "-Ttext=0x\(String(linkAddress, radix: 16))",
        "--oformat", "binary", "-o", binary, object,
      ])
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: binary)))
    guard !bytes.isEmpty else { throw Failure(description: "\(name).S assembled to an empty binary") }
    return bytes
  }

  private static func runTool(_ path: String, _ arguments: [String]) throws {
    try HostCommand.check(path, arguments)
  }
}
