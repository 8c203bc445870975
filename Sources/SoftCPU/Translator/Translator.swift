import CShim
import Glibc
import VMCore

/// How the software CPU executes guest code.
public enum SoftCPUTier: String, Sendable, CaseIterable {
  /// The interpreter only.
  case interpreter = "interp"
  /// Blocks that ran `defaultThreshold` times are translated to host code.
  case translator = "jit"
  /// As `translator`, and every translated block is executed again by the interpreter on a
  /// copy of the state and compared; a difference stops the machine with a report.
  case lockstep

  /// The tier `--accel soft` uses unless told otherwise: the translator, with the interpreter
  /// as its cold tier and fallback.
  public static let standard: SoftCPUTier = .translator

  /// Executions of a block before it is translated.
  public static let defaultThreshold: UInt32 = 32
}

/// MXCSR's exception mask bits (IM, DM, ZM, OM, UM, PM).
let mxcsrExceptionMasks: UInt32 = 0x1F80

/// One vCPU's translating tier: its code buffer, its translations and the context the
/// generated code works on (see BlockTranslation.swift). Used only on the vCPU's thread.
final class Translator {
  /// Code buffer per vCPU.
  static let bufferCapacity = 32 << 20

  let lockstep: Bool
  /// Executions before translation (0: translate on first execution).
  var threshold: UInt32
  /// The code buffer translations are installed in.
  private(set) var buffer: CodeBuffer
  /// Whether a flush moves to a fresh code buffer instead of reusing the old one's addresses,
  /// so that no address names two blocks in the perf map (on when the map is written, and
  /// only then: each such flush keeps the old buffer's address range, its pages given back).
  var keepsCodeAddressesUnique = Translator.perfMap != nil
  /// Buffers left behind by flushes while `keepsCodeAddressesUnique`.
  private(set) var retiredBuffers: [CodeBuffer] = []
  let context: UnsafeMutablePointer<hv_jit_context>
  /// The jump cache (`JumpCache`) generated code chains through.
  let jumpCache: UnsafeMutablePointer<hv_jit_cache_entry>
  /// Hot blocks waiting to be translated (`translatePending`), with the linear RIP each was
  /// entered at.
  var pending: [(block: Int32, rip: UInt64)] = []
  /// A perf map (`/tmp/perf-PID.map`) naming each translation by its guest RIP, so `perf
  /// report` attributes samples in generated code; on when HOSTVISOR_PERF_MAP is set.
  static let perfMap: Int32? = {
    guard getenv("HOSTVISOR_PERF_MAP") != nil else { return nil }
    let descriptor = open("/tmp/perf-\(getpid()).map", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
    return descriptor >= 0 ? descriptor : nil
  }()
  /// Blocks translated together; measured on the default guest's boot (docs/softcpu-performance.md).
  static let batchSize = 16
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
    jumpCache = allocateZeroedPages(hv_jit_cache_entry.self, count: JumpCache.entries)
    context = .allocate(capacity: 1)
    precondition(UInt(bitPattern: context) & 15 == 0 && ContextOffset.vector & 15 == 0)
    let load: @convention(c) (UnsafeMutablePointer<hv_jit_context>?, UInt64, UInt64) -> UInt64 = translatedLoad
    let store: @convention(c) (UnsafeMutablePointer<hv_jit_context>?, UInt64, UInt64, UInt64) -> Void =
      translatedStore
    let vectorLoad: @convention(c) (UnsafeMutablePointer<hv_jit_context>?, UInt64, UInt64) -> Void =
      translatedVectorLoad
    let vectorStore: @convention(c) (UnsafeMutablePointer<hv_jit_context>?, UInt64, UInt64) -> Void =
      translatedVectorStore
    let interpret: @convention(c) (UnsafeMutablePointer<hv_jit_context>?, UInt64, UInt64) -> Void =
      translatedInterpret
    // Every other field starts at zero.
    var initial = hv_jit_context()
    initial.read_tlb = UnsafeMutableRawPointer(cpu.readTLB)
    initial.write_tlb = UnsafeMutableRawPointer(cpu.writeTLB)
    initial.segment_base = UnsafeMutableRawPointer(cpu.segmentBase)
    initial.cpu = Unmanaged.passUnretained(cpu).toOpaque()
    initial.load_helper = unsafeBitCast(load, to: UnsafeMutableRawPointer.self)
    initial.store_helper = unsafeBitCast(store, to: UnsafeMutableRawPointer.self)
    initial.jump_cache = UnsafeMutableRawPointer(jumpCache)
    initial.stop = cpu.translationStopSignal
    initial.xmm = UnsafeMutableRawPointer(cpu.xmm)
    initial.vector_load_helper = unsafeBitCast(vectorLoad, to: UnsafeMutableRawPointer.self)
    initial.vector_store_helper = unsafeBitCast(vectorStore, to: UnsafeMutableRawPointer.self)
    initial.interpret_helper = unsafeBitCast(interpret, to: UnsafeMutableRawPointer.self)
    context.initialize(to: initial)
  }

  deinit {
    context.deallocate()
    freeZeroedPages(jumpCache, count: JumpCache.entries)
  }

  /// Jump-cache entries made under chain generation `addressSpaceEntriesGeneration` for code
  /// fetched through non-global translations: a CR3 write drops them
  /// (`dropAddressSpaceEntries`), and the entries into global code stay.
  var addressSpaceEntries: [Int32] = []
  var addressSpaceEntriesGeneration: UInt64 = ~0

  /// Records that jump-cache entry `index` (made under `chainGeneration`) leads to code of
  /// the current address space only.
  func noteAddressSpaceEntry(_ index: Int, chainGeneration: UInt64) {
    if addressSpaceEntriesGeneration != chainGeneration {
      // A new generation invalidated every older entry already.
      addressSpaceEntries.removeAll(keepingCapacity: true)
      addressSpaceEntriesGeneration = chainGeneration
    }
    addressSpaceEntries.append(Int32(index))
  }

  /// A CR3 write: drops the jump-cache entries recorded by `noteAddressSpaceEntry` (an entry
  /// whose slot a global block took since is dropped too, which costs only a miss).
  func dropAddressSpaceEntries(chainGeneration: UInt64) {
    if addressSpaceEntriesGeneration == chainGeneration {
      for index in addressSpaceEntries {
        jumpCache[Int(index)] = JumpCache.empty
      }
    }
    addressSpaceEntries.removeAll(keepingCapacity: true)
  }

  /// Drops every translation (the code buffer is full, or the decoded blocks were flushed).
  /// The jump cache is left as it is: its entries carry the chain generation they were made
  /// in, and every flush of the decoded blocks starts a new one, so none of them matches again
  /// (clearing its 1 MiB each time made small flushes, such as the fuzz loops' per-run
  /// resets, cost more than the code they ran).
  func flush(blocks: UnsafeMutablePointer<DecodedBlock>, count: Int) {
    for index in 0..<count {
      blocks[index].translation = 0
      blocks[index].translatedCode = nil
      blocks[index].heat = 0
    }
    translations.removeAll(keepingCapacity: true)
    pending.removeAll(keepingCapacity: true)
    waitingLinks.removeAll()
    let held = buffer.used > 0
    buffer.reset()
    if keepsCodeAddressesUnique && held, let fresh = CodeBuffer(capacity: Self.bufferCapacity) {
      buffer.release()
      retiredBuffers.append(buffer)
      buffer = fresh
    }
  }

  /// Gives the code buffer's and the jump cache's pages back to the host; every translation
  /// must have been dropped (`flush`) first (its entries are then stale, and zero pages are
  /// empty entries).
  func releaseCodeMemory() {
    buffer.release()
    let jumpCacheBytes = JumpCache.entries * MemoryLayout<hv_jit_cache_entry>.stride
    releasePages(UnsafeMutableRawPointer(jumpCache), byteCount: jumpCacheBytes)
  }

  /// Queues hot `block` for translation (its `translation` becomes `queuedTranslation`); the
  /// queue is translated together once `batchSize` blocks wait (or at once when the threshold
  /// is 0). Batches exist because installing code costs two `mprotect` calls (W^X), whatever
  /// its size: one batch pays them once.
  func enqueue(_ cpu: CPU, block: Int) {
    cpu.blocks[block].translation = queuedTranslation
    pending.append((Int32(block), cpu.rip))
    if pending.count >= Self.batchSize || threshold == 0 { translatePending(cpu) }
  }

  /// Translates every queued block and installs their code with one protection change; each
  /// block records the result (`translation`, `translatedCode`), or -1 when it has none.
  func translatePending(_ cpu: CPU) {
    var code: [UInt8] = []
    var results: [(block: Int, rip: UInt64, offset: Int, result: TranslatedCode)] = []
    var mapLines = ""
    for (block, rip) in pending.map({ (Int($0.block), $0.rip) })
    where cpu.blocks[block].translation == queuedTranslation {
      cpu.blocks[block].translation = -1
      cpu.blocks[block].heat = 0
      // 64-bit and 32-bit code (the key's top byte is the code size the block was decoded for).
      let codeSize = Int(cpu.blocks[block].key >> 56)
      guard BlockTranslator.translates(codeSize: codeSize) else { continue }
      let first = cpu.blockArena + Int(cpu.blocks[block].first)
      // Lockstep runs one block at a time: no links.
      var translator = BlockTranslator(
        inlineTLBProbes: !lockstep, codeSize: codeSize,
        entryPageOffset: lockstep ? nil : Int(cpu.blocks[block].key & 0xFFF))
      guard let result = translator.translate(first, count: Int(cpu.blocks[block].count), block: Int32(block))
      else {
        // No translated prefix: `heat` keeps how many instructions the interpreter runs before
        // the run loop looks the rest up as a block of its own (0: the whole block).
        cpu.blocks[block].heat = UInt32(
          BlockTranslator.untranslatableLead(
            first, count: Int(cpu.blocks[block].count), interpreting: !lockstep, codeSize: codeSize))
        continue
      }
      // Blocks start on 16-byte boundaries.
      code.append(contentsOf: repeatElement(0xCC, count: (16 - code.count % 16) % 16))
      results.append((block, rip, code.count, result))
      code.append(contentsOf: result.code)
    }
    pending.removeAll(keepingCapacity: true)
    guard !results.isEmpty else { return }
    if !buffer.fits(code.count) {
      // Flushed first, so that links are made only to code that stays.
      cpu.statistics.codeBufferFlushes += 1
      flush(blocks: cpu.blocks, count: cpu.blockCount)
    }
    // Every block's frame set-up is the same, so is the entry chained blocks jump to.
    context.pointee.chain_offset = UInt64(results[0].result.chainEntry)
    let batchOffset = buffer.used
    linkBatch(cpu, results.map { ($0.block, $0.offset, $0.result) }, at: batchOffset, into: &code)
    guard let base = buffer.install(code) else {
      // The links waiting in this batch's code must not be patched into whatever comes next.
      flush(blocks: cpu.blocks, count: cpu.blockCount)
      return
    }
    for (block, rip, offset, result) in results {
      precondition(UInt64(result.chainEntry) == context.pointee.chain_offset)
      translations.append((base + offset, result.instructions, result.undefinedAfter))
      if result.usesFloatingPoint { cpu.translationUsesFloatingPoint = true }
      translatedBlocks += 1
      translatedInstructions += result.instructions
      cpu.blocks[block].translation = Int32(translations.count)
      cpu.blocks[block].translatedCode = base + offset
      if Self.perfMap != nil {
        let start = String(UInt(bitPattern: base + offset), radix: 16)
        mapLines += "\(start) \(String(result.code.count, radix: 16)) guest_\(String(rip, radix: 16))\n"
      }
    }
    if let map = Self.perfMap {
      _ = mapLines.withCString { write(map, $0, strlen($0)) }
    }
    linkWaitingSites(cpu, to: results.map(\.block))
  }

  // MARK: Direct links

  /// A direct exit (`DirectLinkSite`) of installed code whose target had no translation yet.
  struct WaitingLink {
    /// Where the source block's code starts in the buffer.
    var blockOffset: Int
    var site: DirectLinkSite
    /// The source block's second page (`DecodedBlock.secondPage`).
    var sourceSecondPage: UInt64
  }

  /// Waiting direct exits by the block key of their target; emptied by `flush`.
  var waitingLinks: [UInt64: [WaitingLink]] = [:]
  /// Direct exits linked when their block was translated, and later, when their target was.
  var linkedSites = 0
  var lateLinkedSites = 0

  /// The block a direct exit may enter: the one decoded for `key` (the target's physical
  /// address under the source's code size), if it is current (in the block table) and lies on
  /// the source block's pages (`sourceSecondPage`: its second page, `.max` for none). Its
  /// translation may still be in this batch, or not exist yet.
  private func linkTarget(_ cpu: CPU, key: UInt64, sourceSecondPage: UInt64) -> Int? {
    guard let target = cpu.currentBlock(key: key) else { return nil }
    let second = cpu.blocks[target].secondPage
    return second == .max || second == sourceSecondPage ? target : nil
  }

  /// The patches that link `site` of a block whose code starts at buffer offset `blockOffset`
  /// to block `target`, whose code starts at buffer offset `targetOffset`.
  private func patches(
    _ site: DirectLinkSite, blockOffset: Int, target: Int, targetOffset: Int, cpu: CPU
  ) -> [(offset: Int, value: Int32)] {
    let entry = targetOffset + Int(context.pointee.chain_offset)
    return [
      (blockOffset + site.budgetImmediate, Int32(site.instructions + Int(cpu.blocks[target].count))),
      (blockOffset + site.blockImmediate, Int32(target)),
      (blockOffset + site.targetJump, Int32(entry - (blockOffset + site.targetJump + 4))),
      (blockOffset + site.gate, Int32(site.directPath - (site.gate + 4))),
    ]
  }

  /// Links the direct exits of a batch about to be installed at buffer offset `batchOffset`
  /// (`code` holds the batch; `offset` is each block's within it) whose targets have
  /// translations, installed or in the batch; the others wait for theirs (`waitingLinks`).
  private func linkBatch(
    _ cpu: CPU, _ batch: [(block: Int, offset: Int, result: TranslatedCode)], at batchOffset: Int,
    into code: inout [UInt8]
  ) {
    var inBatch: [Int: Int] = [:]
    for (block, offset, _) in batch { inBatch[block] = batchOffset + offset }
    for (block, offset, result) in batch {
      let source = cpu.blocks[block]
      let entryPage = source.firstPage << 12
      let entryOffset = Int(source.key & 0xFFF)
      let blockOffset = batchOffset + offset
      for site in result.linkSites {
        let key = (entryPage | UInt64(entryOffset + site.targetOffset)) | source.key & (0xFF << 56)
        let target = linkTarget(cpu, key: key, sourceSecondPage: source.secondPage)
        let targetOffset: Int? = target.flatMap { target in
          inBatch[target] ?? cpu.blocks[target].translatedCode.map { buffer.offset(of: $0) }
        }
        guard let target, let targetOffset else {
          waitingLinks[key, default: []].append(
            WaitingLink(blockOffset: blockOffset, site: site, sourceSecondPage: source.secondPage))
          continue
        }
        for (at, value) in patches(site, blockOffset: blockOffset, target: target, targetOffset: targetOffset, cpu: cpu)
        {
          code.storeInt32(value, at: at - batchOffset)
        }
        linkedSites += 1
      }
    }
  }

  /// Links the waiting direct exits of installed code to `blocks`, just translated.
  private func linkWaitingSites(_ cpu: CPU, to blocks: [Int]) {
    guard !waitingLinks.isEmpty else { return }
    var patchList: [(offset: Int, value: Int32)] = []
    for block in blocks {
      let key = cpu.blocks[block].key
      guard let waiting = waitingLinks[key], let code = cpu.blocks[block].translatedCode else { continue }
      waitingLinks[key] = nil
      for link in waiting where linkTarget(cpu, key: key, sourceSecondPage: link.sourceSecondPage) == block {
        patchList += patches(
          link.site, blockOffset: link.blockOffset, target: block, targetOffset: buffer.offset(of: code), cpu: cpu)
        lateLinkedSites += 1
      }
    }
    if !patchList.isEmpty && !buffer.patch(patchList) {
      // A protection change failed: translate again from scratch.
      flush(blocks: cpu.blocks, count: cpu.blockCount)
    }
  }
}

/// `DecodedBlock.translation` of a block waiting in the translator's queue.
let queuedTranslation: Int32 = -2

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

  /// Direct exits of translated blocks linked to their target's translation since the tier
  /// was set (see `DirectLinkSite`), when translated or later.
  public var directLinkCount: Int { (translator?.linkedSites ?? 0) + (translator?.lateLinkedSites ?? 0) }

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
    if codeSize != 8 && !flatLegacyCode { return 0 }
    let context = translationContext.unsafelyUnwrapped
    context.pointee.chained = 0
    var code = blocks[block].translatedCode
    if code == nil {
      // Cold (count executions), queued (translate the queue once the block ran as often again
      // while it waited) or without a translation.
      let state = blocks[block].translation
      if state != 0 && state != queuedTranslation { return 0 }
      if blocks[block].heat < translationThreshold &* (state == 0 ? 1 : 2) {
        blocks[block].heat &+= 1
        return 0
      }
      code = translateBlock(block)
      if code == nil { return 0 }
    }
    materializeFlags()
    context.pointee.flags = TranslatedFlags.packed(storedFlags)
    context.pointee.entry_rip = rip
    context.pointee.exit = 0
    context.pointee.tag_extra = tlbTagExtra
    if translationLockstep {
      return runLockstep(block: block)
    }
    context.pointee.generation = chainGenerationAndPrivilege
    let budget: Int64 = debugStopPagesActive ? 0 : Int64(remaining)
    context.pointee.budget = budget
    // This block becomes a chaining target.
    let slot = JumpCache.index(rip)
    let entry = context.pointee.jump_cache.assumingMemoryBound(to: hv_jit_cache_entry.self) + slot
    if entry.pointee.rip != rip || entry.pointee.generation != chainGenerationAndPrivilege {
      entry.pointee = hv_jit_cache_entry(
        rip: rip, generation: chainGenerationAndPrivilege,
        code: code.unsafelyUnwrapped + Int(context.pointee.chain_offset), count: UInt32(blocks[block].count),
        block: Int32(block))
      if !blockCodeIsGlobal(rip, block: block) {
        translator.unsafelyUnwrapped.noteAddressSpaceEntry(slot, chainGeneration: chainGeneration)
      }
    }
    let result = callTranslated(code.unsafelyUnwrapped, context)
    // Each chain into a further block took the completed block's instructions from the budget.
    context.pointee.chained = UInt64(bitPattern: budget &- context.pointee.budget)
    storedFlags = TranslatedFlags.unpacked(context.pointee.flags, into: storedFlags)
    rip = context.pointee.rip
    return result
  }

  /// Calls translated code with the SSE state it checks (`sse_state`) set up: under the
  /// guest's MXCSR when that masks every exception and some translation does floating-point
  /// arithmetic, the status flags it raised then merged into the guest's MXCSR.
  @inline(__always)
  func callTranslated(_ code: UnsafeRawPointer, _ context: UnsafeMutablePointer<hv_jit_context>) -> UInt64 {
    let result: UInt64
    if cr0 & (X86.cr0EM | X86.cr0TS) == 0 && cr4 & X86.cr4OSFXSR != 0 {
      if translationUsesFloatingPoint && mxcsr & mxcsrExceptionMasks == mxcsrExceptionMasks {
        context.pointee.sse_state = 3
        var raised: UInt32 = 0
        result = hv_jit_call_mxcsr(code, context, gpr, mxcsr & ~MXCSR.flags, &raised)
        mxcsr |= raised
      } else {
        context.pointee.sse_state = 1
        result = hv_jit_call(code, context, gpr)
      }
      if context.pointee.sse_written != 0 {
        context.pointee.sse_written = 0
        xsaveInUse |= XSaveModel.sse
      }
    } else {
      context.pointee.sse_state = 0
      result = hv_jit_call(code, context, gpr)
    }
    return result
  }

  /// The generation jump-cache entries and block links (`DecodedBlock.links`) are made and
  /// matched under: the chain generation with the privilege (user or supervisor) in bit 0.
  /// Code entered at one privilege is never chained to at the other: a privilege change
  /// leaves translated code (the instructions that make it are interpreted) without starting a
  /// new chain generation, and a jump from user mode to a supervisor page must fault on its
  /// fetch instead of chaining into code entered at CPL 0. Never 0, the generation of an empty
  /// entry (`chainGeneration` starts at 1).
  @inline(__always)
  var chainGenerationAndPrivilege: UInt64 { chainGeneration << 1 | (tlbTagExtra & 1) }

  /// Whether translated 32-bit code may run now (`BlockTranslator`): a 32-bit stack, CS, DS,
  /// ES and SS with base 0, and RIP below the last 64 KiB, so that no offset within a block
  /// wraps at 4 GiB. The registers these depend on change only in instructions the translator
  /// leaves to the interpreter, which return to the run loop, and a translated block chains
  /// only to blocks that entered the jump cache here (and so passed the same check): every
  /// translated run of 32-bit code starts from this check.
  @inline(__always)
  var flatLegacyCode: Bool {
    stackMask == 0xFFFF_FFFF && rip < 0xFFFF_0000
      && segmentBase[Int(SegmentIndex.es)] | segmentBase[Int(SegmentIndex.cs)] | segmentBase[Int(SegmentIndex.ss)]
        | segmentBase[Int(SegmentIndex.ds)] == 0
  }

  @inline(never)
  func translateBlock(_ block: Int) -> UnsafeRawPointer? {
    guard let translator else { return nil }
    if blocks[block].translation == 0 {
      translator.enqueue(self, block: block)
    } else {
      translator.translatePending(self)
    }
    return blocks[block].translatedCode
  }

  // MARK: Helpers called by translated code

  /// A load the inline TLB probe missed: performed as the interpreter does; on a fault (or,
  /// in lockstep mode, anything but RAM) the block leaves before the instruction.
  func translatedLoad(_ context: UnsafeMutablePointer<hv_jit_context>, _ linear: UInt64, _ size: UInt64) -> UInt64 {
    let guestMXCSR = enterHelper(context)
    defer { leaveHelper(context, guestMXCSR) }
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
      context.pointee.generation = chainGenerationAndPrivilege
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
    let guestMXCSR = enterHelper(context)
    defer { leaveHelper(context, guestMXCSR) }
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
    context.pointee.generation = chainGenerationAndPrivilege
  }

  /// A helper called by translated code runs under the host's MXCSR (translated code may run
  /// under the guest's); returns the MXCSR to restore when it returns.
  @inline(__always)
  func enterHelper(_ context: UnsafeMutablePointer<hv_jit_context>) -> UInt32? {
    guard context.pointee.sse_state & 2 != 0 else { return nil }
    let guestMXCSR = hv_stmxcsr()
    hv_ldmxcsr(UInt32(truncatingIfNeeded: context.pointee.host_mxcsr))
    return guestMXCSR
  }

  @inline(__always)
  func leaveHelper(_ context: UnsafeMutablePointer<hv_jit_context>, _ guestMXCSR: UInt32?) {
    if let guestMXCSR { hv_ldmxcsr(guestMXCSR) }
  }

  /// An instruction of `BlockTranslator.interpretedOps` at `offset` from the block's entry,
  /// run by the interpreter from translated code, with the status flags taken from and given
  /// back to the context. A fault leaves before the instruction (the run loop's interpreter
  /// runs it again and raises the fault exactly); anything that may change what the rest of
  /// the block means ends it after the instruction: a store into decoded code, a new chain
  /// generation, mode, privilege or code size, a RIP other than the next instruction's (a REP
  /// string instruction that stopped early) or a requested exit.
  func translatedInterpret(
    _ context: UnsafeMutablePointer<hv_jit_context>, _ slot: UnsafeMutablePointer<Instruction>, _ offset: UInt64
  ) {
    let guestMXCSR = enterHelper(context)
    defer { leaveHelper(context, guestMXCSR) }
    let start = context.pointee.entry_rip &+ offset
    let next = start &+ UInt64(slot.pointee.length)
    let generation = chainGeneration
    let size = codeSize
    let privilege = cpl
    materializeFlags()
    storedFlags = TranslatedFlags.unpacked(context.pointee.flags, into: storedFlags)
    rip = next
    blockInvalidated = false
    do {
      try executeFast(slot)
    } catch {
      // The run loop's interpreter runs the instruction again (from where a REP instruction
      // got to) and raises the fault; what the failed attempt marked must not stop it first.
      rip = start
      blockInvalidated = false
      context.pointee.exit = 1
      return
    }
    statistics.interpretedInstructions &+= 1
    materializeFlags()
    context.pointee.flags = TranslatedFlags.packed(storedFlags)
    if blockInvalidated || exitRequested || rip != next || chainGeneration != generation || codeSize != size
      || cpl != privilege
    {
      context.pointee.rip = rip
      context.pointee.exit = 2
    }
  }

  /// A vector load the inline TLB probe missed (or that is misaligned): the `size & 0xFF`
  /// bytes at `linear` into the context's `vector` (zero-extended), as the interpreter reads
  /// them (`size & 0x100`: a 16-byte access that must be aligned). A fault leaves before the
  /// instruction.
  func translatedVectorLoad(_ context: UnsafeMutablePointer<hv_jit_context>, _ linear: UInt64, _ size: UInt64) {
    let guestMXCSR = enterHelper(context)
    defer { leaveHelper(context, guestMXCSR) }
    let bytes = size & 0xFF
    if translationLockstep {
      guard size & 0x100 == 0 || linear & 15 == 0, let host = lockstepHost(linear, bytes, write: false) else {
        context.pointee.exit = 1
        return
      }
      switch bytes {
      case 4: context.pointee.vector = (UInt64(hv_load32(host)), 0)
      case 8: context.pointee.vector = (hv_load64(host), 0)
      default: context.pointee.vector = (hv_load64(host), hv_load64(host + 8))
      }
      return
    }
    do {
      switch bytes {
      case 4, 8: context.pointee.vector = (try readMemory(linear, size: UInt8(bytes)), 0)
      default:
        let value = try read128(linear, aligned: size & 0x100 != 0)
        context.pointee.vector = (value[0], value[1])
      }
      context.pointee.generation = chainGenerationAndPrivilege
    } catch {
      context.pointee.exit = 1
    }
  }

  /// A vector store the inline TLB probe missed (or that is misaligned): the low `size & 0xFF`
  /// bytes of the context's `vector` to `linear`, as the interpreter writes them (`size &
  /// 0x100`: must be aligned). A fault leaves before the instruction, a store that
  /// invalidated decoded code ends the block after it.
  func translatedVectorStore(_ context: UnsafeMutablePointer<hv_jit_context>, _ linear: UInt64, _ size: UInt64) {
    let guestMXCSR = enterHelper(context)
    defer { leaveHelper(context, guestMXCSR) }
    let bytes = size & 0xFF
    let (low, high) = context.pointee.vector
    if let translator, translator.lockstep {
      guard size & 0x100 == 0 || linear & 15 == 0, let host = lockstepHost(linear, bytes, write: true) else {
        context.pointee.exit = 1
        return
      }
      switch bytes {
      case 4:
        translator.journal.append((host, 4, UInt64(hv_load32(host))))
        hv_store32(host, UInt32(truncatingIfNeeded: low))
      case 8:
        translator.journal.append((host, 8, hv_load64(host)))
        hv_store64(host, low)
      default:
        translator.journal.append((host, 8, hv_load64(host)))
        translator.journal.append((host + 8, 8, hv_load64(host + 8)))
        hv_store64(host, low)
        hv_store64(host + 8, high)
      }
    } else {
      do {
        switch bytes {
        case 4, 8: try writeMemory(linear, size: UInt8(bytes), low)
        default: try write128(linear, XMMValue(low, high), aligned: size & 0x100 != 0)
        }
      } catch {
        context.pointee.exit = 1
        return
      }
    }
    if blockInvalidated { context.pointee.exit = 2 }
    context.pointee.generation = chainGenerationAndPrivilege
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

/// `slot`: the address of the decoded instruction in the block arena.
private func translatedInterpret(_ context: UnsafeMutablePointer<hv_jit_context>?, _ slot: UInt64, _ offset: UInt64) {
  Unmanaged<CPU>.fromOpaque(context!.pointee.cpu)._withUnsafeGuaranteedRef {
    $0.translatedInterpret(context!, UnsafeMutablePointer(bitPattern: UInt(slot))!, offset)
  }
}

/// Entry points of the helpers for generated code (C calling convention). The CPU is used
/// without a retain: it has weak references (interrupt controllers), so each retain and release
/// would take the runtime's slow side-table path.
private func translatedLoad(_ context: UnsafeMutablePointer<hv_jit_context>?, _ linear: UInt64, _ size: UInt64)
  -> UInt64
{
  Unmanaged<CPU>.fromOpaque(context!.pointee.cpu)._withUnsafeGuaranteedRef { $0.translatedLoad(context!, linear, size) }
}

private func translatedStore(
  _ context: UnsafeMutablePointer<hv_jit_context>?, _ linear: UInt64, _ size: UInt64, _ value: UInt64
) {
  Unmanaged<CPU>.fromOpaque(context!.pointee.cpu)._withUnsafeGuaranteedRef {
    $0.translatedStore(context!, linear, size, value)
  }
}

private func translatedVectorLoad(_ context: UnsafeMutablePointer<hv_jit_context>?, _ linear: UInt64, _ size: UInt64) {
  Unmanaged<CPU>.fromOpaque(context!.pointee.cpu)._withUnsafeGuaranteedRef {
    $0.translatedVectorLoad(context!, linear, size)
  }
}

private func translatedVectorStore(
  _ context: UnsafeMutablePointer<hv_jit_context>?, _ linear: UInt64, _ size: UInt64
) {
  Unmanaged<CPU>.fromOpaque(context!.pointee.cpu)._withUnsafeGuaranteedRef {
    $0.translatedVectorStore(context!, linear, size)
  }
}

/// The guest's status flags as translated code keeps them in `hv_jit_context.flags`: what
/// LAHF leaves in AH (SF, ZF, AF, PF, CF and the always-set bit 1) in bits 8-15 and OF in bit
/// 0, as SETO leaves it in AL, so a block stores them with LAHF, SETO and one store, and loads
/// them with ADD AL, 7FH and SAHF (`X86Emitter.storeGuestFlags`, `loadGuestFlags`; the same
/// layout as the flags parked in EBP). Bits 1-7 and 16-31 of a stored value are left as the
/// store found them (zero) and ignored.
enum TranslatedFlags {
  /// The packed form of `rflags`' status flags.
  static func packed(_ rflags: UInt64) -> UInt64 {
    ((rflags & lahfFlags) | 0x2) << 8 | (rflags >> 11) & 1
  }

  /// `rflags` with its status flags taken from `packed`.
  static func unpacked(_ packed: UInt64, into rflags: UInt64) -> UInt64 {
    (rflags & ~RFlags.status) | (packed >> 8) & lahfFlags | (packed & 1) << 11
  }

  /// SF, ZF, AF, PF and CF: the status flags LAHF and SAHF carry.
  static let lahfFlags: UInt64 = RFlags.status & ~RFlags.of
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
    let savedXMM = (0..<16).map { xmm[$0] }
    let savedMXCSR = mxcsr
    let savedXSaveInUse = xsaveInUse
    translator.journal.removeAll(keepingCapacity: true)
    let result = callTranslated(entry.code, context)
    let executed = Int(result & 0xFFFF_FFFF)
    let translatedGPR = (0..<16).map { gpr[$0] }
    let translatedXMM = (0..<16).map { xmm[$0] }
    let translatedMXCSR = mxcsr
    let translatedRIP = context.pointee.rip
    let translatedFlags = TranslatedFlags.unpacked(context.pointee.flags, into: savedFlags)
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
    for index in 0..<16 { xmm[index] = savedXMM[index] }
    mxcsr = savedMXCSR
    xsaveInUse = savedXSaveInUse
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
    for index in 0..<16 where xmm[index] != translatedXMM[index] {
      differences.append(
        "XMM\(index): translated \(hex(translatedXMM[index][1]))_\(hex(translatedXMM[index][0])), "
          + "interpreted \(hex(xmm[index][1]))_\(hex(xmm[index][0]))")
    }
    if mxcsr != translatedMXCSR {
      differences.append("MXCSR: translated \(hex(UInt64(translatedMXCSR))), interpreted \(hex(UInt64(mxcsr)))")
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
