import Foundation
import Glibc
import TestSupport
import Testing
import VMCore

@testable import GDBStub

/// Support for running the real `hostvisor` and Debian's gdb against our own guests.
enum GDBTestSupport {
  static var hostvisor: String {
    let testBinary = URL(
      fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        ?? CommandLine.arguments[0])
    return testBinary.deletingLastPathComponent().appendingPathComponent("hostvisor").path
  }

  struct ToolFailure: Error, CustomStringConvertible {
    var description: String
  }

  /// Runs a tool to completion and returns its standard output.
  @discardableResult
  static func tool(_ path: String, _ arguments: [String]) throws -> String {
    let result = try HostCommand.run(path, arguments, errors: .discarded, timeout: 120)
    guard result.status == 0, !result.timedOut else {
      throw ToolFailure(description: "\(path) \(arguments.joined(separator: " ")) failed")
    }
    return result.text
  }

  /// Assembles and links Tests/GuestPrograms/gdb/NAME.S as a 64-bit ELF with its symbols.
  static func buildGuest(_ name: String, in directory: URL) throws -> String {
    let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
      .appendingPathComponent("GuestPrograms/gdb/\(name).S").path
    let object = directory.appendingPathComponent("\(name).o").path
    let image = directory.appendingPathComponent("\(name).elf").path
    try tool("/usr/bin/as", ["--64", "-o", object, source])
    try tool("/usr/bin/ld", ["-m", "elf_x86_64", "-Ttext", "0x100000", "-o", image, object])
    return image
  }

  /// Symbol addresses from `nm`.
  static func symbols(_ image: String) throws -> [String: UInt64] {
    var table: [String: UInt64] = [:]
    for line in try tool("/usr/bin/nm", [image]).split(separator: "\n") {
      let fields = line.split(separator: " ")
      if fields.count == 3, let address = UInt64(fields[0], radix: 16) { table[String(fields[2])] = address }
    }
    return table
  }

  /// Instruction start addresses from `objdump -d`, in order.
  static func instructionAddresses(_ image: String) throws -> [UInt64] {
    try tool("/usr/bin/objdump", ["-d", "-w", image]).split(separator: "\n").compactMap { line in
      // "  10002a:\t48 bb ...  \tmovabs ..."
      let trimmed = line.drop { $0 == " " }
      guard let colon = trimmed.firstIndex(of: ":"), line.contains("\t") else { return nil }
      return UInt64(trimmed[..<colon], radix: 16)
    }
  }

  /// A TCP port nobody listens on right now.
  static func freePort() -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    _ = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return UInt16(bigEndian: address.sin_port)
  }

  /// Whether this host's KVM is usable by us.
  static var kvmAvailable: Bool { access("/dev/kvm", R_OK | W_OK) == 0 }
}

/// A running `hostvisor run --gdb PORT --gdb-wait` and one gdb batch session against it.
struct DebugSession {
  var gdbOutput: String
  var hostvisorStatus: Int32
  var hostvisorError: String

  static func run(image: String, accelerator: String, commands: [String], extraArguments: [String] = [])
    throws -> DebugSession
  {
    let port = GDBTestSupport.freePort()
    let machineError = CollectedOutput()
    let machine = try HostProcess(
      GDBTestSupport.hostvisor,
      [
        "run", "--kernel", image, "--accel", accelerator, "--memory", "64M", "--serial", "none",
        "--gdb", "127.0.0.1:\(port)", "--gdb-wait",
      ] + extraArguments, errors: { machineError.append($0) }, output: { _ in })
    // The stub listens before the machine runs; wait for the line that says so.
    machineError.waitFor("listening", timeout: 60) { !machine.isRunning }
    var arguments = ["-batch", "-nx", "-ex", "set pagination off", "-ex", "file \(image)"]
    arguments += ["-ex", "target remote 127.0.0.1:\(port)"]
    for command in commands { arguments += ["-ex", command] }
    let gdb = try HostCommand.run("/usr/bin/gdb", arguments, errors: .merged, timeout: 120)
    if !machine.waitUntilExit(timeout: gdb.timedOut ? 0 : 120) {
      machine.terminate()
      machine.waitUntilExit(timeout: 10)
    }
    machine.waitForOutputEnd()
    return DebugSession(
      gdbOutput: gdb.text + (gdb.timedOut ? "\n(gdb did not finish in 120 s)" : ""),
      hostvisorStatus: machine.terminationStatus, hostvisorError: machineError.text)
  }

  /// The value printed by a `printf "NAME=%lx\n"` command, if any.
  func value(_ name: String) -> UInt64? {
    for line in gdbOutput.split(separator: "\n") where line.hasPrefix("\(name)=") {
      return UInt64(line.dropFirst(name.count + 1), radix: 16)
    }
    return nil
  }
}

@Suite("gdb stub with Debian's gdb", .serialized)
struct GDBStubGuestTests {
  static let accelerators: [String] = ["soft"] + (GDBTestSupport.kvmAvailable ? ["kvm"] : [])

  /// A hardware breakpoint on a function stops there, registers and memory read back as the
  /// guest wrote them, register and memory writes read back, `stepi` advances by one
  /// instruction, a watchpoint stops on the write, and `continue` runs to the guest's exit.
  @Test(arguments: accelerators)
  func breakpointsRegistersMemoryStepWatchAndExit(accelerator: String) throws {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gdbstub-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let image = try GDBTestSupport.buildGuest("debuggee64", in: directory)
    let symbols = try GDBTestSupport.symbols(image)
    let instructions = try GDBTestSupport.instructionAddresses(image)
    let fillRegisters = try #require(symbols["fill_registers"])
    let fillDone = try #require(symbols["fill_done"])
    let firstIndex = try #require(instructions.firstIndex(of: fillRegisters))
    let secondInstruction = instructions[firstIndex + 1]
    let countUp = try #require(symbols["count_up"])
    // The watchpoint stops after the first `incq counter(%rip)`: the instruction after it.
    let countIndex = try #require(instructions.firstIndex(of: countUp))
    let afterIncrement = instructions[countIndex + 2]

    let session = try DebugSession.run(
      image: image, accelerator: accelerator,
      commands: [
        "printf \"START=%lx\\n\", $pc",
        "hbreak fill_registers",
        "continue",
        "printf \"ENTRY=%lx\\n\", $pc",
        "stepi",
        "printf \"STEP=%lx\\n\", $pc",
        "printf \"RBXSTEP=%lx\\n\", $rbx",
        "hbreak *fill_done",
        "continue",
        "printf \"DONE=%lx\\n\", $pc",
        "printf \"RBX=%lx\\n\", $rbx",
        "printf \"R12=%lx\\n\", $r12",
        "printf \"RCX=%lx\\n\", $rcx",
        "printf \"PATTERN0=%lx\\n\", *(long *)&pattern",
        "printf \"PATTERN1=%lx\\n\", *((long *)&pattern + 1)",
        "printf \"XMM3=%lx\\n\", $xmm3.v2_int64[0]",
        "printf \"XMM3HIGH=%lx\\n\", $xmm3.v2_int64[1]",
        "printf \"CR4=%lx\\n\", $cr4",
        "set $r13 = 0x5eed5eed",
        "printf \"R13=%lx\\n\", $r13",
        "set var *((long *)&pattern + 1) = 0x600df00d",
        "printf \"PATTERNW=%lx\\n\", *((long *)&pattern + 1)",
        "monitor xp 0x\(String(try #require(symbols["pattern"]), radix: 16)) 16",
        "delete",
        "watch *(long *)&counter",
        "continue",
        "printf \"WATCH=%lx\\n\", $pc",
        "printf \"COUNTER=%lx\\n\", *(long *)&counter",
        "delete",
        "continue",
      ])
    let log = "gdb output:\n\(session.gdbOutput)\nhostvisor stderr:\n\(session.hostvisorError)"
    #expect(session.value("START") == symbols["_start"], "\(log)")
    #expect(session.value("ENTRY") == fillRegisters, "\(log)")
    #expect(session.value("STEP") == secondInstruction, "\(log)")
    #expect(session.value("RBXSTEP") == 0x1122_3344_5566_7788, "\(log)")
    #expect(session.value("DONE") == fillDone, "\(log)")
    #expect(session.value("RBX") == 0x1122_3344_5566_7788, "\(log)")
    #expect(session.value("R12") == 0xA5A5_A5A5_DEAD_BEEF, "\(log)")
    #expect(session.value("RCX") == 0x1234, "\(log)")
    #expect(session.value("PATTERN0") == 0x0123_4567_89AB_CDEF, "\(log)")
    #expect(session.value("PATTERN1") == 0xFEDC_BA98_7654_3210, "\(log)")
    #expect(session.value("XMM3") == 0x0123_4567_89AB_CDEF, "\(log)")
    #expect(session.value("XMM3HIGH") == 0xFEDC_BA98_7654_3210, "\(log)")
    #expect(session.value("CR4").map { $0 & 0x620 } == 0x620, "\(log)")
    #expect(session.value("R13") == 0x5EED_5EED, "\(log)")
    #expect(session.value("PATTERNW") == 0x600D_F00D, "\(log)")
    #expect(session.gdbOutput.contains(": ef cd ab 89 67 45 23 01 0d f0 0d 60 00 00 00 00"), "\(log)")
    // Watchpoints on KVM use the debug registers, which this machine's nested KVM does not
    // apply to guest code (its emulator ignores data breakpoints; natively run code does not
    // see DR0-DR3 either): checked on the software CPU only, where they compare memory.
    if accelerator == "soft" {
      #expect(session.gdbOutput.contains("Old value = 0") && session.gdbOutput.contains("New value = 1"), "\(log)")
      #expect(session.value("WATCH") == afterIncrement, "\(log)")
      #expect(session.value("COUNTER") == 1, "\(log)")
    }
    #expect(session.gdbOutput.contains("exited with code 0103"), "\(log)")
    #expect(session.hostvisorStatus == 67, "\(log)")
  }
}
