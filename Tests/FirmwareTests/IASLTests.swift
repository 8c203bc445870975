import Foundation
import TestSupport
import Testing

@testable import Firmware

/// The ACPICA compiler/disassembler, if installed (Debian: acpica-tools).
let iaslPath: String? = ["/usr/bin/iasl", "/usr/local/bin/iasl", "/usr/sbin/iasl"].first {
  FileManager.default.isExecutableFile(atPath: $0)
}

/// Runs iasl with `arguments` in `directory`; returns its exit status and combined output.
func runIASL(_ arguments: [String], in directory: URL) throws -> (status: Int32, output: String) {
  let result = try HostCommand.run(iaslPath!, arguments, errors: .merged, directory: directory.path, timeout: 120)
  if result.timedOut { throw HostCommandError("iasl did not finish in 120 s") }
  return (result.status, result.text)
}

@Suite(.enabled(if: iaslPath != nil, "iasl (acpica-tools) is not installed"))
struct IASLTests {
  @Test(arguments: ["FACP", "APIC", "DSDT", "XSDT", "RSDT", "FACS"])
  func disassemblesWithoutErrors(signature: String) throws {
    var configuration = ACPIConfiguration(cpuCount: 2)
    configuration.dsdtTerms = [
      AML.scope(
        "\\_SB",
        [
          AML.device(
            "PCI0",
            [
              AML.name("_HID", AML.eisaID("PNP0A03")), AML.name("_UID", AML.integer(0)),
              AML.method("_STA", [AML.returnValue(AML.integer(0x0F))]),
            ])
        ])
    ]
    let tables = try ACPITables.build(configuration)
    let bytes = try #require(tables.tables.first { String(decoding: $0.bytes.prefix(4), as: UTF8.self) == signature })
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("hostvisor-iasl-\(UUID())")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let file = directory.appendingPathComponent("\(signature.lowercased()).dat")
    try Data(bytes.bytes).write(to: file)

    let disassembly = try runIASL(["-d", file.lastPathComponent], in: directory)
    #expect(disassembly.status == 0, "iasl -d failed:\n\(disassembly.output)")
    #expect(!disassembly.output.localizedCaseInsensitiveContains("error"), "\(disassembly.output)")
    let dsl = directory.appendingPathComponent("\(signature.lowercased()).dsl")
    let source = try String(contentsOf: dsl, encoding: .utf8)
    #expect(!source.contains("**** Unknown"), "iasl did not understand part of the table:\n\(source)")
    #expect(!source.contains("Invalid"), "\(source)")

    guard signature == "DSDT" else { return }
    #expect(source.contains("Name (\\_S5, Package (0x04)"))
    #expect(source.contains("Device (PCI0)"))
    // The disassembled DSDT compiles back without errors.
    let recompile = try runIASL([dsl.lastPathComponent], in: directory)
    #expect(recompile.status == 0, "iasl could not recompile the DSDT:\n\(recompile.output)")
  }
}
