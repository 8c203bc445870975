import CShim
import Glibc

/// How the software CPU executes guest code.
public enum SoftCPUTier: String, Sendable, CaseIterable {
  /// The interpreter only.
  case interpreter = "interp"
  /// Blocks that ran `defaultThreshold` times are translated to host code.
  case translator = "jit"
  /// As `translator`, and every translated block is executed again by the interpreter on a
  /// copy of the state and compared; a difference stops the machine with a report.
  case lockstep

  /// Executions of a block before it is translated.
  public static let defaultThreshold: UInt32 = 32
}

/// One vCPU's translating tier: its code buffer, its translations and the context the
/// generated code works on (see BlockTranslation.swift). Used only on the vCPU's thread.
final class Translator {
  /// Code buffer per vCPU.
  static let bufferCapacity = 16 << 20

  let lockstep: Bool
  /// Executions before translation (0: translate on first execution).
  var threshold: UInt32
  let buffer: CodeBuffer
  let context: UnsafeMutablePointer<hv_jit_context>
  /// The jump cache (`JumpCache`) generated code chains through.
  let jumpCache: UnsafeMutablePointer<hv_jit_cache_entry>
  /// Translated blocks: entry point, instruction count, flags undefined after each count.
  var translations: [(code: UnsafeRawPointer, instructions: Int, undefinedAfter: [UInt64])] = []
  /// The first lockstep difference (the machine stops on it).
  var lockstepFailure: String?
  /// Stores of the translated block being checked in lockstep: host address, size, old value.
  var journal: [(host: UnsafeMutableRawPointer, size: Int, old: UInt64)] = []

  // Statistics.
  var translatedBlocks = 0
  var translatedInstructions = 0
  var lockstepChecks = 0

  init?(cpu: CPU, tier: SoftCPUTier, threshold: UInt32) {
    guard tier != .interpreter, let buffer = CodeBuffer(capacity: Self.bufferCapacity) else { return nil }
    precondition(MemoryLayout<TLBEntry>.stride == 16 && MemoryLayout<TLBEntry>.offset(of: \.delta) == 8)
    lockstep = tier == .lockstep
    self.threshold = threshold
    self.buffer = buffer
    precondition(MemoryLayout<hv_jit_cache_entry>.stride == 32)
    jumpCache = .allocate(capacity: JumpCache.entries)
    jumpCache.initialize(repeating: hv_jit_cache_entry(), count: JumpCache.entries)
    context = .allocate(capacity: 1)
    let load: @convention(c) (UnsafeMutablePointer<hv_jit_context>?, UInt64, UInt64) -> UInt64 = translatedLoad
    let store: @convention(c) (UnsafeMutablePointer<hv_jit_context>?, UInt64, UInt64, UInt64) -> Void =
      translatedStore
    context.initialize(
      to: hv_jit_context(
        flags: 0, rip: 0, exit: 0, read_tlb: UnsafeMutableRawPointer(cpu.readTLB),
        write_tlb: UnsafeMutableRawPointer(cpu.writeTLB), tag_extra: 0,
        segment_base: UnsafeMutableRawPointer(cpu.segmentBase),
        cpu: Unmanaged.passUnretained(cpu).toOpaque(),
        load_helper: unsafeBitCast(load, to: UnsafeMutableRawPointer.self),
        store_helper: unsafeBitCast(store, to: UnsafeMutableRawPointer.self), entry_rip: 0, generation: 0,
        budget: 0, chained: 0, last_block: 0, jump_cache: UnsafeMutableRawPointer(jumpCache),
        stop: cpu.translationStopSignal, chain_offset: 0))
  }

  deinit {
    context.deallocate()
    jumpCache.deallocate()
  }

  /// Drops every translation (the code buffer is full, or the decoded blocks were flushed).
  func flush(blocks: UnsafeMutablePointer<DecodedBlock>, count: Int) {
    for index in 0..<count {
      blocks[index].translation = 0
      blocks[index].translatedCode = nil
      blocks[index].heat = 0
    }
    translations.removeAll(keepingCapacity: true)
    jumpCache.update(repeating: hv_jit_cache_entry(), count: JumpCache.entries)
    buffer.reset()
  }

  /// Translates `block` and records the result in it (`translation`, `translatedCode`).
  func translate(_ cpu: CPU, block: Int) {
    let first = cpu.blockArena + Int(cpu.blocks[block].first)
    var translator = BlockTranslator(inlineTLBProbes: !lockstep)
    cpu.blocks[block].translation = -1
    guard cpu.codeSize == 8, let result = translator.translate(first, count: Int(cpu.blocks[block].count))
    else { return }
    var code = buffer.install(result.code)
    if code == nil {
      flush(blocks: cpu.blocks, count: cpu.blockCount)
      cpu.blocks[block].translation = -1
      code = buffer.install(result.code)
    }
    guard let code else { return }
    // Every block's frame set-up is the same, so is the entry chained blocks jump to.
    context.pointee.chain_offset = UInt64(result.chainEntry)
    translations.append((code, result.instructions, result.undefinedAfter))
    translatedBlocks += 1
    translatedInstructions += result.instructions
    cpu.blocks[block].translation = Int32(translations.count)
    cpu.blocks[block].translatedCode = code
  }
}

extension CPU {
  /// Selects the execution tier (`threshold`: executions of a block before it is translated;
  /// 0 translates every block on its first execution). Call before `run`, on the vCPU thread.
  public func setExecutionTier(_ tier: SoftCPUTier, threshold: UInt32 = SoftCPUTier.defaultThreshold) {
    translator = Translator(cpu: self, tier: tier, threshold: threshold)
    translationEnabled = translator != nil
    translationLockstep = translator?.lockstep ?? false
    translationThreshold = threshold
    translationContext = translator?.context
    flushDecodedBlocks()
  }

  /// The execution tier in use.
  public var executionTier: SoftCPUTier {
    guard let translator else { return .interpreter }
    return translator.lockstep ? .lockstep : .translator
  }

  /// The report of the first lockstep difference, if any (the run then stopped).
  public var lockstepFailure: String? { translator?.lockstepFailure }

  /// Blocks translated since the tier was set (including ones dropped by flushes).
  public var translatedBlockCount: Int { translator?.translatedBlocks ?? 0 }

  /// Translated blocks compared with the interpreter in lockstep mode.
  public var lockstepCheckCount: Int { translator?.lockstepChecks ?? 0 }

  /// Runs the translated prefix of `block` (if it has one, or translates it once hot) with
  /// `rip` at its first instruction; returns the instructions completed and whether the block
  /// ended (`translationEndedBit`). 0 when nothing ran.
  ///
  /// Unless in lockstep mode the block may chain into further translated blocks (through the
  /// jump cache) while their instructions fit `remaining`; the context's `chained` then counts
  /// the instructions of the blocks completed before the last one and `last_block` names it
  /// (the result is that block's).
  @inline(__always)
  func runTranslated(block: Int, remaining: Int) -> UInt64 {
    let context = translationContext.unsafelyUnwrapped
    context.pointee.chained = 0
    var code = blocks[block].translatedCode
    if code == nil {
      if blocks[block].translation != 0 { return 0 }
      if blocks[block].heat < translationThreshold {
        blocks[block].heat &+= 1
        return 0
      }
      code = translateBlock(block)
      if code == nil { return 0 }
    }
    materializeFlags()
    context.pointee.flags = storedFlags
    context.pointee.entry_rip = rip
    context.pointee.exit = 0
    context.pointee.tag_extra = tlbTagExtra
    if translationLockstep {
      return runLockstep(block: block)
    }
    context.pointee.generation = chainGeneration
    context.pointee.budget = debugStopPagesActive ? 0 : Int64(remaining)
    // This block becomes a chaining target.
    let entry = context.pointee.jump_cache.assumingMemoryBound(to: hv_jit_cache_entry.self) + JumpCache.index(rip)
    if entry.pointee.rip != rip || entry.pointee.generation != chainGeneration {
      entry.pointee = hv_jit_cache_entry(
        rip: rip, generation: chainGeneration,
        code: code.unsafelyUnwrapped + Int(context.pointee.chain_offset), count: UInt32(blocks[block].count),
        block: Int32(block))
    }
    let result = hv_jit_call(code.unsafelyUnwrapped, context, gpr)
    storedFlags = context.pointee.flags
    rip = context.pointee.rip
    return result
  }

  @inline(never)
  func translateBlock(_ block: Int) -> UnsafeRawPointer? {
    translator?.translate(self, block: block)
    return blocks[block].translatedCode
  }

  // MARK: Helpers called by translated code

  /// A load the inline TLB probe missed: performed as the interpreter does; on a fault (or,
  /// in lockstep mode, anything but RAM) the block leaves before the instruction.
  func translatedLoad(_ context: UnsafeMutablePointer<hv_jit_context>, _ linear: UInt64, _ size: UInt64) -> UInt64 {
    if translationLockstep {
      guard let host = lockstepHost(linear, size, write: false) else {
        context.pointee.exit = 1
        return 0
      }
      switch size {
      case 1: return UInt64(hv_load8(host))
      case 2: return UInt64(hv_load16(host))
      case 4: return UInt64(hv_load32(host))
      default: return hv_load64(host)
      }
    }
    do {
      let value = try readMemory(linear, size: UInt8(size))
      context.pointee.generation = chainGeneration
      return value
    } catch {
      context.pointee.exit = 1
      return 0
    }
  }

  /// A store the inline TLB probe missed (code pages, MMIO, first touch): performed as the
  /// interpreter does; a fault leaves before the instruction, a store that invalidated decoded
  /// code ends the block after it.
  func translatedStore(
    _ context: UnsafeMutablePointer<hv_jit_context>, _ linear: UInt64, _ size: UInt64, _ value: UInt64
  ) {
    if let translator, translator.lockstep {
      guard let host = lockstepHost(linear, size, write: true) else {
        context.pointee.exit = 1
        return
      }
      let old: UInt64
      switch size {
      case 1:
        old = UInt64(hv_load8(host))
        hv_store8(host, UInt8(truncatingIfNeeded: value))
      case 2:
        old = UInt64(hv_load16(host))
        hv_store16(host, UInt16(truncatingIfNeeded: value))
      case 4:
        old = UInt64(hv_load32(host))
        hv_store32(host, UInt32(truncatingIfNeeded: value))
      default:
        old = hv_load64(host)
        hv_store64(host, value)
      }
      translator.journal.append((host, Int(size), old))
    } else {
      do {
        try writeMemory(linear, size: UInt8(size), value)
      } catch {
        context.pointee.exit = 1
        return
      }
    }
    if blockInvalidated { context.pointee.exit = 2 }
    context.pointee.generation = chainGeneration
  }

  /// Lockstep mode: the host address of a RAM access within one page, or nil (faults, MMIO and
  /// page-crossing accesses are left to the interpreter).
  func lockstepHost(_ linear: UInt64, _ size: UInt64, write: Bool) -> UnsafeMutableRawPointer? {
    guard linear & 0xFFF <= 0x1000 - size,
      let physical = try? translate(linear, access: write ? .write : .read)
    else { return nil }
    return write ? writableRAM(linear, physical: physical) : ramPointer(physical)
  }
}

/// Entry points of the helpers for generated code (C calling convention).
private func translatedLoad(_ context: UnsafeMutablePointer<hv_jit_context>?, _ linear: UInt64, _ size: UInt64)
  -> UInt64
{
  let cpu = Unmanaged<CPU>.fromOpaque(context!.pointee.cpu).takeUnretainedValue()
  return cpu.translatedLoad(context!, linear, size)
}

private func translatedStore(
  _ context: UnsafeMutablePointer<hv_jit_context>?, _ linear: UInt64, _ size: UInt64, _ value: UInt64
) {
  let cpu = Unmanaged<CPU>.fromOpaque(context!.pointee.cpu).takeUnretainedValue()
  cpu.translatedStore(context!, linear, size, value)
}

extension CPU {
  /// Lockstep mode: runs the translated block, undoes its effects, runs the same instructions
  /// in the interpreter and compares registers, RIP, the defined status flags and the bytes
  /// the block stored. The interpreter's result is kept. A difference is recorded in
  /// `lockstepFailure` and stops `run`.
  @inline(never)
  func runLockstep(block: Int) -> UInt64 {
    let translator = self.translator!
    let entry = translator.translations[Int(blocks[block].translation) - 1]
    let context = translator.context
    let savedGPR = (0..<16).map { gpr[$0] }
    let savedRIP = rip
    let savedFlags = storedFlags
    translator.journal.removeAll(keepingCapacity: true)
    let result = hv_jit_call(entry.code, context, gpr)
    let executed = Int(result & 0xFFFF_FFFF)
    let translatedGPR = (0..<16).map { gpr[$0] }
    let translatedRIP = context.pointee.rip
    let translatedFlags = context.pointee.flags
    let translatedInvalidated = blockInvalidated
    func load(_ host: UnsafeMutableRawPointer, _ size: Int) -> UInt64 {
      switch size {
      case 1: return UInt64(hv_load8(host))
      case 2: return UInt64(hv_load16(host))
      case 4: return UInt64(hv_load32(host))
      default: return hv_load64(host)
      }
    }
    func store(_ host: UnsafeMutableRawPointer, _ size: Int, _ value: UInt64) {
      switch size {
      case 1: hv_store8(host, UInt8(truncatingIfNeeded: value))
      case 2: hv_store16(host, UInt16(truncatingIfNeeded: value))
      case 4: hv_store32(host, UInt32(truncatingIfNeeded: value))
      default: hv_store64(host, value)
      }
    }
    let stored = translator.journal.map { (host: $0.host, size: $0.size, value: load($0.host, $0.size)) }
    for write in translator.journal.reversed() { store(write.host, write.size, write.old) }

    // The same instructions in the interpreter, from the same state.
    for index in 0..<16 { gpr[index] = savedGPR[index] }
    rip = savedRIP
    storedFlags = savedFlags
    flagOp = .none
    blockInvalidated = false
    let first = blockArena + Int(blocks[block].first)
    var done = 0
    var fault: Fault?
    while done < executed && !blockInvalidated {
      let slot = first + done
      let start = rip
      rip = start &+ UInt64(slot.pointee.length)
      do {
        try executeFast(slot)
      } catch {
        fault = error
        rip = start
        break
      }
      done += 1
    }
    materializeFlags()
    translator.lockstepChecks += 1

    var differences: [String] = []
    if let fault { differences.append("the interpreter raised vector \(fault.vector) at instruction \(done)") }
    if done != executed { differences.append("instructions: translated \(executed), interpreted \(done)") }
    if rip != translatedRIP { differences.append("RIP: translated \(hex(translatedRIP)), interpreted \(hex(rip))") }
    for index in 0..<16 where gpr[index] != translatedGPR[index] {
      differences.append("R\(index): translated \(hex(translatedGPR[index])), interpreted \(hex(gpr[index]))")
    }
    let compared = ~(entry.undefinedAfter[min(executed, entry.instructions)])
    if (storedFlags ^ translatedFlags) & compared != 0 {
      differences.append("RFLAGS: translated \(hex(translatedFlags)), interpreted \(hex(storedFlags))")
    }
    for write in stored where load(write.host, write.size) != write.value {
      differences.append(
        "memory at host \(write.host): translated \(hex(write.value)), interpreted \(hex(load(write.host, write.size)))"
      )
    }
    if !differences.isEmpty && translator.lockstepFailure == nil {
      var lines = ["lockstep: translated block at RIP \(hex(savedRIP)) differs from the interpreter"]
      lines.append("  instructions: " + (0..<executed).map { "\((first + $0).pointee.fast)" }.joined(separator: ", "))
      lines += differences.map { "  " + $0 }
      lines.append(
        "  before: " + savedGPR.enumerated().map { "R\($0.offset)=\(hex($0.element))" }.joined(separator: " "))
      lines.append("  flags before: \(hex(savedFlags))")
      translator.lockstepFailure = lines.joined(separator: "\n")
      requestStop()
    }
    blockInvalidated = blockInvalidated || translatedInvalidated
    return UInt64(done) | (blockInvalidated ? translationEndedBit : 0)
  }

  private func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
}
