// A small x86-64 assembler for the translator: exactly the instructions the translator emits,
// encoded from the Intel SDM's tables (volume 2, chapter 2: REX, ModRM, SIB; the opcode maps of
// appendix A). Operands are host registers 0-15 (RAX..R15) and base + index * scale + disp32
// memory operands; branches use 32-bit displacements resolved at `finish`.

/// Host general registers in encoding order.
enum HostRegister {
  static let rax: UInt8 = 0
  static let rcx: UInt8 = 1
  static let rdx: UInt8 = 2
  static let rbx: UInt8 = 3
  static let rsp: UInt8 = 4
  static let rbp: UInt8 = 5
  static let rsi: UInt8 = 6
  static let rdi: UInt8 = 7
  static let r8: UInt8 = 8
  static let r9: UInt8 = 9
  static let r10: UInt8 = 10
  static let r11: UInt8 = 11
  static let r12: UInt8 = 12
  static let r13: UInt8 = 13
  static let r14: UInt8 = 14
  static let r15: UInt8 = 15
}

/// A register or memory operand of an emitted instruction.
enum HostOperand {
  case register(UInt8)
  /// [base + index << scale + displacement]; `index` nil for none.
  case memory(base: UInt8, index: UInt8?, scale: UInt8, displacement: Int32)

  /// [base + displacement].
  static func at(_ base: UInt8, _ displacement: Int) -> HostOperand {
    .memory(base: base, index: nil, scale: 0, displacement: Int32(displacement))
  }
}

/// The eight classic ALU operations in their opcode order (`/digit` of 80/81/83).
enum HostALU: UInt8 {
  case add = 0, or, adc, sbb, and, sub, xor, cmp
}

/// Shift operations by their `/digit` in C0/C1/D2/D3.
enum HostShift: UInt8 {
  case rol = 0, ror = 1, shl = 4, shr = 5, sar = 7
}

/// How an emitted instruction uses its r/m operand: what the guest-register cache
/// (`X86Emitter.cachedRegisters`) must do when that operand is a guest register's slot.
enum OperandAccess {
  /// Read only: a cached register is read from its host register.
  case read
  /// Written (or read and written): the host register is written and then stored to the slot;
  /// a 4-byte write, which would zero the host register's upper half where the slot keeps its
  /// own, goes to the slot and the host register is reloaded from it.
  case write
  /// Not an access (LEA's address).
  case address
  /// An SSE instruction's general-register operand (the r/m field names an XMM register
  /// there): the slot is used in memory; `vectorWrite` reloads the host register after.
  case vectorRead, vectorWrite
}

/// A branch target inside the code being assembled.
struct HostLabel {
  let id: Int
}

/// Assembles x86-64 machine code into a byte array.
struct X86Emitter {
  private(set) var bytes: [UInt8] = []
  private var labelOffsets: [Int?] = []
  private var fixups: [(at: Int, label: Int)] = []

  /// The guest-register cache of the block being assembled: entry `n` is the host register that
  /// holds guest register `n` (its 8-byte slot at [RBX + 8n]), 0 for none; empty when nothing
  /// is cached. An operand naming a cached slot is rewritten by `encode`: reads take the host
  /// register, writes go to it and are then stored to the slot (write-through), so the slot is
  /// always current and every exit, fault and helper sees the register file as before. The host
  /// registers are caller-saved: `call` reloads them after every helper call. The block's entry
  /// sets it, then loads them (`loadCachedRegisters`). Every instruction that writes its r/m
  /// operand completes that write itself (`completeAccess`) before it returns.
  var cachedRegisters: [UInt8] = []
  /// The offset of the block's entry RIP within its page when its branches to the same page
  /// may be linked directly to their target's translation (`directExit`); nil for none.
  var entryPageOffset: Int?
  /// The direct exits emitted so far (`directExit`), for the translator to link.
  var linkSites: [DirectLinkSite] = []
  /// The store (or reload) that completes the last instruction's write of a cached slot.
  private var pendingSlotUpdate: (store: Bool, host: UInt8, displacement: Int32)?

  init() {
    bytes.reserveCapacity(1024)
  }

  var count: Int { bytes.count }

  // MARK: Labels

  mutating func newLabel() -> HostLabel {
    labelOffsets.append(nil)
    return HostLabel(id: labelOffsets.count - 1)
  }

  mutating func bind(_ label: HostLabel) {
    labelOffsets[label.id] = bytes.count
  }

  /// Resolves branch displacements; nil if a label was never bound.
  func finish() -> [UInt8]? {
    var code = bytes
    for fixup in fixups {
      guard let target = labelOffsets[fixup.label] else { return nil }
      code.storeInt32(Int32(target - (fixup.at + 4)), at: fixup.at)
    }
    return code
  }

  // MARK: Raw encoding

  mutating func byte(_ value: UInt8) { bytes.append(value) }

  mutating func int16(_ value: Int16) {
    let bits = UInt16(bitPattern: value)
    bytes.append(UInt8(truncatingIfNeeded: bits))
    bytes.append(UInt8(truncatingIfNeeded: bits >> 8))
  }

  mutating func int32(_ value: Int32) {
    let bits = UInt32(bitPattern: value)
    for shift in stride(from: 0, to: 32, by: 8) { bytes.append(UInt8(truncatingIfNeeded: bits >> UInt32(shift))) }
  }

  mutating func int64(_ value: UInt64) {
    for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
  }

  /// Emits [66] [REX] opcode [second opcode byte] ModRM [SIB] [disp] for `reg` (register or
  /// /digit) and `rm`.
  /// `size` 2 adds the operand-size prefix, 8 sets REX.W; 1 forces a REX prefix when a byte
  /// register 4-7 is named (SPL..DIL rather than AH..BH).
  ///
  /// `access` says how the instruction uses `rm` (see `cachedRegisters`); an instruction that
  /// writes it calls `completeAccess()` after its last byte.
  mutating func encode(
    _ opcode: UInt8, _ secondOpcode: UInt8? = nil, size: Int, reg: UInt8, rm: HostOperand,
    access: OperandAccess = .read
  ) {
    assert(pendingSlotUpdate == nil, "an instruction that wrote a cached slot did not complete its access")
    var operand = rm
    if !cachedRegisters.isEmpty, case .memory(let base, nil, _, let displacement) = rm, base == HostRegister.rbx,
      displacement >= 0, displacement < 8 * 16
    {
      let host = cachedRegisters[Int(displacement >> 3)]
      let wholeSlot = displacement & 7 == 0
      if host != 0 {
        let slot = displacement & ~7
        switch access {
        case .read:
          if wholeSlot { operand = .register(host) }
        case .write:
          if wholeSlot && size != 4 {
            operand = .register(host)
            pendingSlotUpdate = (store: true, host: host, displacement: slot)
          } else {
            pendingSlotUpdate = (store: false, host: host, displacement: slot)
          }
        case .vectorWrite:
          pendingSlotUpdate = (store: false, host: host, displacement: slot)
        case .address, .vectorRead:
          break
        }
      }
    }
    encodeUncached(opcode, secondOpcode, size: size, reg: reg, rm: operand)
  }

  /// Completes a write of a cached guest register (see `cachedRegisters`): stores the host
  /// register to its slot, or reloads it from a slot written in memory. Nothing otherwise.
  mutating func completeAccess() {
    guard let update = pendingSlotUpdate else { return }
    pendingSlotUpdate = nil
    let slot = HostOperand.at(HostRegister.rbx, Int(update.displacement))
    encodeUncached(update.store ? 0x89 : 0x8B, size: 8, reg: update.host, rm: slot)
  }

  /// The host register holding the guest register whose whole slot is `operand`
  /// ([RBX + 8n]), nil when that register is not cached (or `operand` is not a whole slot).
  func cachedHost(_ operand: HostOperand) -> UInt8? {
    guard !cachedRegisters.isEmpty, case .memory(let base, nil, _, let displacement) = operand,
      base == HostRegister.rbx, displacement >= 0, displacement < 8 * 16, displacement & 7 == 0
    else { return nil }
    let host = cachedRegisters[Int(displacement >> 3)]
    return host == 0 ? nil : host
  }

  /// Stores the cached host register `host` to its guest register's slot `operand`: the
  /// write-through after an instruction that wrote `host` itself (see `cachedHost`).
  mutating func storeToSlot(_ host: UInt8, _ operand: HostOperand) {
    assert(cachedHost(operand) == host, "not the slot of that host register")
    encodeUncached(0x89, size: 8, reg: host, rm: operand)
  }

  /// Loads every cached guest register from its slot into its host register (a block's entry,
  /// and after a helper call).
  mutating func loadCachedRegisters() {
    for (register, host) in cachedRegisters.enumerated() where host != 0 {
      encodeUncached(0x8B, size: 8, reg: host, rm: .at(HostRegister.rbx, register * 8))
    }
  }

  private mutating func encodeUncached(
    _ opcode: UInt8, _ secondOpcode: UInt8? = nil, size: Int, reg: UInt8, rm: HostOperand
  ) {
    if size == 2 { byte(0x66) }
    var rex: UInt8 = size == 8 ? 0x08 : 0
    if reg & 8 != 0 { rex |= 0x04 }
    var forceREX = size == 1 && reg & 0xF >= 4 && reg & 0xF <= 7
    switch rm {
    case .register(let register):
      if register & 8 != 0 { rex |= 0x01 }
      if size == 1 && register >= 4 && register <= 7 { forceREX = true }
    case .memory(let base, let index, _, _):
      if base & 8 != 0 { rex |= 0x01 }
      if let index, index & 8 != 0 { rex |= 0x02 }
    }
    if rex != 0 || forceREX { byte(0x40 | rex) }
    bytes.append(opcode)
    if let secondOpcode { bytes.append(secondOpcode) }
    let regBits = (reg & 7) << 3
    switch rm {
    case .register(let register):
      byte(0xC0 | regBits | (register & 7))
    case .memory(let base, let index, let scale, let displacement):
      let needsSIB = index != nil || base & 7 == HostRegister.rsp
      let mode: UInt8
      if displacement == 0 && base & 7 != HostRegister.rbp {
        mode = 0x00
      } else if Int32(Int8(truncatingIfNeeded: displacement)) == displacement {
        mode = 0x40
      } else {
        mode = 0x80
      }
      if needsSIB {
        byte(mode | regBits | 4)
        let indexBits = (index ?? HostRegister.rsp) & 7
        byte((scale & 3) << 6 | indexBits << 3 | (base & 7))
      } else {
        byte(mode | regBits | (base & 7))
      }
      if mode == 0x40 {
        byte(UInt8(bitPattern: Int8(truncatingIfNeeded: displacement)))
      } else if mode == 0x80 {
        int32(displacement)
      }
    }
  }

  // MARK: Instructions

  /// `op rm, reg` (size 1, 2, 4, 8).
  mutating func alu(_ op: HostALU, size: Int, _ rm: HostOperand, _ reg: UInt8) {
    encode(op.rawValue << 3 | (size == 1 ? 0 : 1), size: size, reg: reg, rm: rm, access: op == .cmp ? .read : .write)
    completeAccess()
  }

  /// `op reg, rm`.
  mutating func alu(_ op: HostALU, size: Int, _ reg: UInt8, _ rm: HostOperand) {
    encode(op.rawValue << 3 | (size == 1 ? 2 : 3), size: size, reg: reg, rm: rm)
  }

  /// `op rm, imm` (the immediate is sign-extended by the CPU for sizes 4 and 8).
  mutating func alu(_ op: HostALU, size: Int, _ rm: HostOperand, immediate: Int32) {
    let access: OperandAccess = op == .cmp ? .read : .write
    if size == 1 {
      encode(0x80, size: 1, reg: op.rawValue, rm: rm, access: access)
      byte(UInt8(truncatingIfNeeded: immediate))
    } else if Int32(Int8(truncatingIfNeeded: immediate)) == immediate {
      encode(0x83, size: size, reg: op.rawValue, rm: rm, access: access)
      byte(UInt8(truncatingIfNeeded: immediate))
    } else {
      encode(0x81, size: size, reg: op.rawValue, rm: rm, access: access)
      if size == 2 { int16(Int16(truncatingIfNeeded: immediate)) } else { int32(immediate) }
    }
    completeAccess()
  }

  /// `op rm, imm32` always in its 32-bit immediate form (0x81), whose immediate (the last four
  /// bytes emitted) can be patched later. Sizes 4 and 8.
  mutating func aluWithPatchableImmediate(_ op: HostALU, size: Int, _ rm: HostOperand, immediate: Int32) {
    encode(0x81, size: size, reg: op.rawValue, rm: rm, access: op == .cmp ? .read : .write)
    int32(immediate)
    completeAccess()
  }

  /// `test rm, reg`.
  mutating func test(size: Int, _ rm: HostOperand, _ reg: UInt8) {
    encode(size == 1 ? 0x84 : 0x85, size: size, reg: reg, rm: rm)
  }

  /// `test rm, imm`.
  mutating func test(size: Int, _ rm: HostOperand, immediate: Int32) {
    encode(size == 1 ? 0xF6 : 0xF7, size: size, reg: 0, rm: rm)
    switch size {
    case 1: byte(UInt8(truncatingIfNeeded: immediate))
    case 2: int16(Int16(truncatingIfNeeded: immediate))
    default: int32(immediate)
    }
  }

  /// `mov rm, reg`.
  mutating func mov(size: Int, _ rm: HostOperand, _ reg: UInt8) {
    encode(size == 1 ? 0x88 : 0x89, size: size, reg: reg, rm: rm, access: .write)
    completeAccess()
  }

  /// `mov reg, rm` (size 4 zero-extends into the full register).
  mutating func mov(size: Int, _ reg: UInt8, _ rm: HostOperand) {
    encode(size == 1 ? 0x8A : 0x8B, size: size, reg: reg, rm: rm)
  }

  /// `mov rm, imm` (size 8: imm32 sign-extended).
  mutating func mov(size: Int, _ rm: HostOperand, immediate: Int32) {
    encode(size == 1 ? 0xC6 : 0xC7, size: size, reg: 0, rm: rm, access: .write)
    switch size {
    case 1: byte(UInt8(truncatingIfNeeded: immediate))
    case 2: int16(Int16(truncatingIfNeeded: immediate))
    default: int32(immediate)
    }
    completeAccess()
  }

  /// `mov reg, imm64`.
  mutating func movImmediate64(_ reg: UInt8, _ value: UInt64) {
    byte(0x48 | (reg & 8 != 0 ? 1 : 0))
    byte(0xB8 | (reg & 7))
    int64(value)
  }

  /// `movzx reg32, byte/word rm`.
  mutating func movzx(_ reg: UInt8, sourceSize: Int, _ rm: HostOperand) {
    encode(0x0F, sourceSize == 1 ? 0xB6 : 0xB7, size: 4, reg: reg, rm: rm)
  }

  /// `movsx reg, byte/word rm` with a 4- or 8-byte destination, or `movsxd reg64, rm32`.
  mutating func movsx(size: Int, _ reg: UInt8, sourceSize: Int, _ rm: HostOperand) {
    switch sourceSize {
    case 1: encode(0x0F, 0xBE, size: size, reg: reg, rm: rm)
    case 2: encode(0x0F, 0xBF, size: size, reg: reg, rm: rm)
    default: encode(0x63, size: 8, reg: reg, rm: rm)
    }
  }

  /// `lea reg64, [memory]`.
  mutating func lea(_ reg: UInt8, _ memory: HostOperand) {
    encode(0x8D, size: 8, reg: reg, rm: memory, access: .address)
  }

  /// `lea reg, [memory]` with a `size`-byte result (4: the address wraps at 4 GiB and the
  /// register is zero-extended).
  mutating func lea(size: Int, _ reg: UInt8, _ memory: HostOperand) {
    encode(0x8D, size: size, reg: reg, rm: memory, access: .address)
  }

  /// `shl/shr/sar rm, imm8`.
  mutating func shift(_ op: HostShift, size: Int, _ rm: HostOperand, count: UInt8) {
    encode(size == 1 ? 0xC0 : 0xC1, size: size, reg: op.rawValue, rm: rm, access: .write)
    byte(count)
    completeAccess()
  }

  /// `shl/shr/sar rm, cl`.
  mutating func shiftByCL(_ op: HostShift, size: Int, _ rm: HostOperand) {
    encode(size == 1 ? 0xD2 : 0xD3, size: size, reg: op.rawValue, rm: rm, access: .write)
    completeAccess()
  }

  /// INC (/0), DEC (/1) on FE/FF; NOT (/2), NEG (/3) on F6/F7.
  /// `mul rm` (RDX:RAX = RAX * rm, unsigned).
  mutating func mul(size: Int, _ rm: HostOperand) { encode(size == 1 ? 0xF6 : 0xF7, size: size, reg: 4, rm: rm) }
  /// One-operand `imul rm` (RDX:RAX = RAX * rm, signed).
  mutating func imul(size: Int, _ rm: HostOperand) { encode(size == 1 ? 0xF6 : 0xF7, size: size, reg: 5, rm: rm) }
  mutating func inc(size: Int, _ rm: HostOperand) {
    encode(size == 1 ? 0xFE : 0xFF, size: size, reg: 0, rm: rm, access: .write)
    completeAccess()
  }
  mutating func dec(size: Int, _ rm: HostOperand) {
    encode(size == 1 ? 0xFE : 0xFF, size: size, reg: 1, rm: rm, access: .write)
    completeAccess()
  }
  mutating func not(size: Int, _ rm: HostOperand) {
    encode(size == 1 ? 0xF6 : 0xF7, size: size, reg: 2, rm: rm, access: .write)
    completeAccess()
  }
  /// `div rm` (unsigned RDX:RAX / rm; raises #DE on a zero divisor or a quotient overflow).
  mutating func div(size: Int, _ rm: HostOperand) { encode(size == 1 ? 0xF6 : 0xF7, size: size, reg: 6, rm: rm) }
  mutating func neg(size: Int, _ rm: HostOperand) {
    encode(size == 1 ? 0xF6 : 0xF7, size: size, reg: 3, rm: rm, access: .write)
    completeAccess()
  }

  /// `imul reg, rm` (size 4 or 8).
  mutating func imul(size: Int, _ reg: UInt8, _ rm: HostOperand) {
    encode(0x0F, 0xAF, size: size, reg: reg, rm: rm)
  }

  /// `imul reg, rm, imm32`.
  mutating func imul(size: Int, _ reg: UInt8, _ rm: HostOperand, immediate: Int32) {
    encode(0x69, size: size, reg: reg, rm: rm)
    int32(immediate)
  }

  /// `cmovcc reg, rm`.
  mutating func cmov(_ condition: UInt8, size: Int, _ reg: UInt8, _ rm: HostOperand) {
    encode(0x0F, 0x40 | (condition & 0xF), size: size, reg: reg, rm: rm)
  }

  /// `setcc byte rm`.
  mutating func set(_ condition: UInt8, _ rm: HostOperand) {
    encode(0x0F, 0x90 | (condition & 0xF), size: 1, reg: 0, rm: rm, access: .write)
    completeAccess()
  }

  /// `jcc label` (rel32).
  mutating func jump(_ condition: UInt8, to label: HostLabel) {
    byte(0x0F)
    byte(0x80 | (condition & 0xF))
    fixups.append((bytes.count, label.id))
    int32(0)
  }

  /// `jmp label` (rel32).
  mutating func jump(to label: HostLabel) {
    byte(0xE9)
    fixups.append((bytes.count, label.id))
    int32(0)
  }

  /// `call rm` (an absolute address in a register or memory), then the cached guest
  /// registers reloaded (the callee may clobber their caller-saved host registers, and a helper
  /// may change the guest's).
  mutating func call(_ rm: HostOperand) {
    encode(0xFF, size: 4, reg: 2, rm: rm)
    loadCachedRegisters()
  }

  /// `jmp rm` (an absolute address in a register or memory).
  mutating func jumpIndirect(_ rm: HostOperand) {
    encode(0xFF, size: 4, reg: 4, rm: rm)
  }

  mutating func push(_ reg: UInt8) {
    if reg & 8 != 0 { byte(0x41) }
    byte(0x50 | (reg & 7))
  }

  mutating func pop(_ reg: UInt8) {
    if reg & 8 != 0 { byte(0x41) }
    byte(0x58 | (reg & 7))
  }

  /// An SSE instruction `[prefix] 0F opcode /r` (`prefix` 0 for none; 66, F3 or F2 otherwise)
  /// with XMM register `reg` and `rm` (an XMM register number or memory); `wide` sets REX.W.
  /// `writesRM`: the instruction stores to `rm` (a general register's slot in MOVD/MOVQ).
  mutating func sse(
    prefix: UInt8, opcode: UInt8, wide: Bool = false, reg: UInt8, rm: HostOperand, writesRM: Bool = false
  ) {
    if prefix != 0 { byte(prefix) }
    encode(0x0F, opcode, size: wide ? 8 : 4, reg: reg, rm: rm, access: writesRM ? .vectorWrite : .vectorRead)
    completeAccess()
  }

  /// `movdqu xmm, m128/xmm`.
  mutating func loadVector(_ register: UInt8, _ source: HostOperand) {
    sse(prefix: 0xF3, opcode: 0x6F, reg: register, rm: source)
  }

  /// `movdqu m128/xmm, xmm`.
  mutating func storeVector(_ destination: HostOperand, _ register: UInt8) {
    sse(prefix: 0xF3, opcode: 0x7F, reg: register, rm: destination)
  }

  /// BT (4), BTS (5), BTR (6) or BTC (7) `rm, imm8` (0F BA /digit ib).
  mutating func bitTest(_ digit: UInt8, size: Int, _ rm: HostOperand, bit: UInt8) {
    encode(0x0F, 0xBA, size: size, reg: digit, rm: rm, access: digit == 4 ? .read : .write)
    byte(bit)
    completeAccess()
  }

  /// `cmpxchg rm, reg` (compares with RAX/EAX/AX/AL).
  mutating func compareExchange(size: Int, _ rm: HostOperand, _ reg: UInt8) {
    encode(0x0F, size == 1 ? 0xB0 : 0xB1, size: size, reg: reg, rm: rm, access: .write)
    completeAccess()
  }

  /// `xadd rm, reg`.
  mutating func exchangeAdd(size: Int, _ rm: HostOperand, _ reg: UInt8) {
    encode(0x0F, size == 1 ? 0xC0 : 0xC1, size: size, reg: reg, rm: rm, access: .write)
    completeAccess()
  }

  /// CBW (size 2), CWDE (4) or CDQE (8).
  mutating func convertAccumulator(size: Int) {
    if size == 2 { byte(0x66) } else if size == 8 { byte(0x48) }
    byte(0x98)
  }

  /// CWD (size 2), CDQ (4) or CQO (8).
  mutating func convertToDouble(size: Int) {
    if size == 2 { byte(0x66) } else if size == 8 { byte(0x48) }
    byte(0x99)
  }

  /// `bswap reg` (size 4 or 8).
  mutating func byteSwap(size: Int, _ reg: UInt8) {
    byte(0x40 | (size == 8 ? 0x08 : 0) | (reg & 8 != 0 ? 1 : 0))
    byte(0x0F)
    byte(0xC8 | (reg & 7))
  }

  /// Raw bytes.
  mutating func raw(_ values: UInt8...) { bytes.append(contentsOf: values) }

  /// `jrcxz` over the code `body` emits (at most 127 bytes; no flags read or written).
  mutating func skipIfRCXIsZero(_ body: (inout X86Emitter) -> Void) {
    byte(0xE3)
    byte(0)
    let start = bytes.count
    body(&self)
    let length = bytes.count - start
    precondition(length <= 127, "jrcxz body too long")
    bytes[start - 1] = UInt8(length)
  }

  /// LAHF: AH = SF:ZF:0:AF:0:PF:1:CF.
  mutating func loadFlagsIntoAH() { byte(0x9F) }
  /// SAHF: SF, ZF, AF, PF, CF from AH.
  mutating func storeAHIntoFlags() { byte(0x9E) }
  mutating func ret() { byte(0xC3) }

  /// After a multiply whose low result is in RAX (EAX for `size` 4) and whose CF = OF is the
  /// host's: sets SF, ZF and PF from that result and clears AF, as the interpreter does
  /// (`recordMultiplyFlags`), for hosts whose multiplies leave other undefined flags. Uses CL
  /// and AH.
  mutating func interpreterMultiplyFlags(size: Int) {
    raw(0x0F, 0x92, 0xC1)  // setc cl
    if size == 8 { byte(0x48) }
    raw(0x85, 0xC0)  // test rax, rax (or eax): SF, ZF, PF; CF = OF = 0
    loadFlagsIntoAH()
    raw(0x80, 0xE4, 0xEF)  // and ah, ~AF
    raw(0x08, 0xCC)  // or ah, cl: CF
    raw(0x80, 0xC1, 0x7F)  // add cl, 0x7F: OF = cl
    storeAHIntoFlags()  // SF, ZF, AF, PF, CF; OF stays
  }

  /// After a rotate by a nonzero immediate, with the result in RDX (EDX for `size` 4): keeps
  /// CF and the flags a rotate leaves alone, and sets OF as the interpreter does for every
  /// count (Flags.swift): ROL the result's top bit XOR CF, ROR the XOR of its two top bits.
  /// Uses AH, CL and DL.
  mutating func interpreterRotateFlags(_ op: HostShift, size: Int) {
    loadFlagsIntoAH()  // SF, ZF, AF, PF as before the rotate; CF from it
    if op == .rol {
      if size == 8 { byte(0x48) }
      raw(0xC1, 0xEA, UInt8(size * 8) - 1)  // shr rdx, 63 (edx, 31): the top bit
      raw(0x88, 0xE1, 0x80, 0xE1, 0x01, 0x30, 0xCA)  // mov cl, ah; and cl, 1; xor dl, cl: XOR CF
      raw(0x80, 0xC2, 0x7F)  // add dl, 0x7F: OF = dl
    } else {
      overflowFromTheTwoTopBitsOfRDX(size: size)
    }
    storeAHIntoFlags()
  }

  /// OF = the XOR of the two top bits of RDX (EDX for `size` 4); clobbers DL and the other
  /// status flags.
  private mutating func overflowFromTheTwoTopBitsOfRDX(size: Int) {
    if size == 8 { byte(0x48) }
    raw(0xC1, 0xEA, UInt8(size * 8) - 2)  // shr rdx, 62 (edx, 30): the two top bits
    raw(0x80, 0xC2, 0x01, 0x80, 0xE2, 0x02, 0xD0, 0xEA)  // add dl, 1; and dl, 2; shr dl, 1: their XOR
    raw(0x80, 0xC2, 0x7F)  // add dl, 0x7F: OF = dl
  }

  /// After a shift by a nonzero immediate, with the operand's value before the shift in RDX
  /// (EDX for `size` 4): keeps CF, SF, ZF and PF as the host set them, clears AF, and sets OF
  /// as the interpreter does for every count (Flags.swift): SHL the XOR of the operand's two
  /// top bits, SHR its top bit, SAR 0. Uses AH and DL.
  mutating func interpreterShiftFlags(_ op: HostShift, size: Int) {
    loadFlagsIntoAH()
    raw(0x80, 0xE4, 0xEF)  // and ah, ~AF (also OF = 0)
    let bits = UInt8(size * 8)
    switch op {
    case .shr:
      if size == 8 { byte(0x48) }
      raw(0xC1, 0xEA, bits - 1)  // shr rdx, 63 (edx, 31): the top bit
      raw(0x80, 0xC2, 0x7F)  // add dl, 0x7F: OF = dl
    case .shl:
      overflowFromTheTwoTopBitsOfRDX(size: size)
    default:
      break  // SAR: OF stays 0 from the AND
    }
    storeAHIntoFlags()
  }
}

/// Condition codes in the Jcc/SETcc/CMOVcc encoding.
enum HostCondition {
  static let overflow: UInt8 = 0
  static let below: UInt8 = 2
  static let aboveOrEqual: UInt8 = 3
  static let equal: UInt8 = 4
  static let notEqual: UInt8 = 5
  static let less: UInt8 = 0xC
  static let greater: UInt8 = 0xF
}

extension [UInt8] {
  /// Writes `value` little-endian over the four bytes at `index` (a displacement or immediate
  /// of assembled code).
  mutating func storeInt32(_ value: Int32, at index: Int) {
    Swift.withUnsafeBytes(of: value.littleEndian) { raw in
      for byte in 0..<4 { self[index + byte] = raw[byte] }
    }
  }
}
