/// The register layout the stub announces through `qXfer:features:read:target.xml`: gdb's
/// standard x86-64 features (core, SSE, segments) plus the system registers in a feature of
/// our own, so `info registers cr3` works. The `g` packet carries registers in this order.
enum GDBTargetDescription {
  /// One register: name, size in bytes, gdb type, group.
  struct Register {
    var name: String
    var size: Int
    var type: String
    var group: String? = nil
  }

  static let generalNames = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
  ]
  static let segmentNames = ["cs", "ss", "ds", "es", "fs", "gs"]
  static let x87ControlNames = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
  static let controlNames = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]

  static let core: [Register] =
    generalNames.map { name in
      Register(name: name, size: 8, type: name == "rbp" || name == "rsp" ? "data_ptr" : "int64")
    } + [Register(name: "rip", size: 8, type: "code_ptr"), Register(name: "eflags", size: 4, type: "i386_eflags")]
    + segmentNames.map { Register(name: $0, size: 4, type: "int32") }
    + (0..<8).map { Register(name: "st\($0)", size: 10, type: "i387_ext") }
    + x87ControlNames.map { Register(name: $0, size: 4, type: "int", group: "float") }
  static let sse: [Register] =
    (0..<16).map { Register(name: "xmm\($0)", size: 16, type: "vec128") }
    + [Register(name: "mxcsr", size: 4, type: "i386_mxcsr", group: "vector")]
  static let segmentBases: [Register] = [
    Register(name: "fs_base", size: 8, type: "int"), Register(name: "gs_base", size: 8, type: "int"),
  ]
  static let system: [Register] = controlNames.map { Register(name: $0, size: 8, type: "int64", group: "system") }

  /// All registers in `g` packet order.
  static let registers: [Register] = core + sse + segmentBases + system

  /// Byte offset of each register in the `g` packet.
  static let offsets: [Int] = {
    var offsets: [Int] = []
    var offset = 0
    for register in registers {
      offsets.append(offset)
      offset += register.size
    }
    return offsets
  }()

  /// Size of the `g` packet's register block.
  static let totalSize = registers.reduce(0) { $0 + $1.size }

  private static func feature(_ name: String, _ registers: [Register], types: String, firstNumber: Int) -> String {
    var text = "<feature name=\"\(name)\">\n" + types
    for (index, register) in registers.enumerated() {
      text += "  <reg name=\"\(register.name)\" bitsize=\"\(register.size * 8)\" type=\"\(register.type)\""
      text += " regnum=\"\(firstNumber + index)\""
      if let group = register.group { text += " group=\"\(group)\"" }
      text += "/>\n"
    }
    return text + "</feature>\n"
  }

  private static let coreTypes = """
      <flags id="i386_eflags" size="4">
        <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
        <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
        <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
        <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
        <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
        <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
        <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
        <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
        <field name="ID" start="21" end="21"/>
      </flags>

    """

  private static let sseTypes = """
      <vector id="v8bf16" type="bfloat16" count="8"/>
      <vector id="v8h" type="ieee_half" count="8"/>
      <vector id="v4f" type="ieee_single" count="4"/>
      <vector id="v2d" type="ieee_double" count="2"/>
      <vector id="v16i8" type="int8" count="16"/>
      <vector id="v8i16" type="int16" count="8"/>
      <vector id="v4i32" type="int32" count="4"/>
      <vector id="v2i64" type="int64" count="2"/>
      <union id="vec128">
        <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
        <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
        <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
        <field name="uint128" type="uint128"/>
      </union>
      <flags id="i386_mxcsr" size="4">
        <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
        <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
        <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
        <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
        <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
        <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
        <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
      </flags>

    """

  /// The XML document for `target.xml`.
  static let xml: String = {
    var text = """
      <?xml version="1.0"?>
      <!DOCTYPE target SYSTEM "gdb-target.dtd">
      <target version="1.0">
      <architecture>i386:x86-64</architecture>

      """
    var number = 0
    text += feature("org.gnu.gdb.i386.core", core, types: coreTypes, firstNumber: number)
    number += core.count
    text += feature("org.gnu.gdb.i386.sse", sse, types: sseTypes, firstNumber: number)
    number += sse.count
    text += feature("org.gnu.gdb.i386.segments", segmentBases, types: "", firstNumber: number)
    number += segmentBases.count
    text += feature("org.hostvisor.x86.system", system, types: "", firstNumber: number)
    return text + "</target>\n"
  }()

  /// Serializes `file` in `g` order (little-endian).
  static func encode(_ file: GDBRegisterFile) -> [UInt8] {
    var bytes: [UInt8] = []
    bytes.reserveCapacity(totalSize)
    func append(_ value: UInt64, _ size: Int) {
      for index in 0..<size { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * index))) }
    }
    for value in file.general { append(value, 8) }
    append(file.rip, 8)
    append(file.rflags, 4)
    for selector in file.segments { append(UInt64(selector), 4) }
    for value in file.st { bytes += value.prefix(10) + [UInt8](repeating: 0, count: max(0, 10 - value.count)) }
    for value in file.x87Control { append(UInt64(value), 4) }
    for value in file.xmm { bytes += value.prefix(16) + [UInt8](repeating: 0, count: max(0, 16 - value.count)) }
    append(UInt64(file.mxcsr), 4)
    append(file.fsBase, 8)
    append(file.gsBase, 8)
    for value in file.control { append(value, 8) }
    return bytes
  }

  /// Replaces register `number` in `file` with `bytes` (its exact size); false when the number
  /// or size is wrong.
  static func set(_ number: Int, to bytes: ArraySlice<UInt8>, in file: inout GDBRegisterFile) -> Bool {
    guard number >= 0, number < registers.count, bytes.count == registers[number].size else { return false }
    var value: UInt64 = 0
    for (index, byte) in bytes.prefix(8).enumerated() { value |= UInt64(byte) << (8 * index) }
    switch number {
    case 0..<16: file.general[number] = value
    case 16: file.rip = value
    case 17: file.rflags = value
    case 18..<24: file.segments[number - 18] = UInt16(truncatingIfNeeded: value)
    case 24..<32: file.st[number - 24] = Array(bytes)
    case 32..<40: file.x87Control[number - 32] = UInt32(truncatingIfNeeded: value)
    case 40..<56: file.xmm[number - 40] = Array(bytes)
    case 56: file.mxcsr = UInt32(truncatingIfNeeded: value)
    case 57: file.fsBase = value
    case 58: file.gsBase = value
    default: file.control[number - 59] = value
    }
    return true
  }

  /// Parses a whole `G` block onto `file`; false when its size is wrong.
  static func decode(_ bytes: [UInt8], into file: inout GDBRegisterFile) -> Bool {
    guard bytes.count == totalSize else { return false }
    for number in 0..<registers.count {
      let start = offsets[number]
      guard set(number, to: bytes[start..<start + registers[number].size], in: &file) else { return false }
    }
    return true
  }
}
