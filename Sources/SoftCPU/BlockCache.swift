import Glibc
import Synchronization
import VMCore

// Decoded-block cache. Instructions are decoded once into a bump-allocated arena; a block is a
// run of consecutive arena slots. A direct-mapped table maps the block key (guest-physical
// start address | code size << 56) to the block. A block ends at an unconditional control
// transfer (a taken Jcc leaves its block early, a not-taken one falls through inside it), a
// mode/interrupt-state changing instruction, an undecodable instruction, a page boundary
// (an instruction crossing it is the last one; the block is then registered on both pages),
// or after `maximumBlockInstructions`. When the arena or the block list is full, everything
// is flushed; nothing is allocated per execution.
//
// Code pages: each physical page with blocks heads a linked list of them (`codePageHead`). The
// write TLB never holds a code page, so every store to one reaches `invalidateCodePage`
// (from the slow write path), which unlinks the page's blocks and stops the current block
// after the storing instruction (self-modifying code then re-decodes).
//
// Multiple vCPUs: each CPU keeps its own cache; stores by one vCPU to code another decoded
// reach that one through CodeCoherence.swift.

/// Instructions the arena holds before a full flush.
let blockArenaCapacity = 1 << 19
/// Blocks before a full flush.
let maximumBlocks = 1 << 16
/// Slots of the direct-mapped lookup table (power of two).
let blockTableSize = 1 << 16
/// Longest block.
let maximumBlockInstructions = 64

/// A decoded block: `count` instructions starting at `blockArena[first]`.
struct DecodedBlock {
  var key: UInt64
  var first: Int32
  var count: Int32
  /// Physical page numbers the block's bytes came from (`secondPage == .max` when one page).
  var firstPage: UInt64
  var secondPage: UInt64
  /// Next block (index + 1, 0 = end) in the list of `firstPage` / `secondPage`.
  var nextOnFirstPage: Int32
  var nextOnSecondPage: Int32
  /// Links to the two blocks that followed most recently (valid while `linkGeneration` is
  /// current and the fetch address CS.base + RIP equals the link's `rip`): skip the TLB and
  /// table lookups between hot blocks. Two links cover both exits of a conditional branch.
  var linkGeneration: UInt64 = ~0
  var links: (BlockLink, BlockLink) = (BlockLink(), BlockLink())
  /// Translating tier (Translator/): executions counted before translation (once the
  /// translation is -1: how many untranslatable instructions the block starts with before a
  /// translatable one, or 0), the translation (index + 1 into `Translator.translations`; 0 none
  /// yet, -1 none possible) and its code.
  var heat: UInt32 = 0
  var translation: Int32 = 0
  var translatedCode: UnsafeRawPointer? = nil
}

/// One block-to-block link: the fetch address it was made for and the target block, with the
/// target's `first` and `count` copied so a chained transfer does one load less.
struct BlockLink {
  /// Non-canonical when unused, so it never equals a fetch address (~0 did: a jump to
  /// 0xFFFF_FFFF_FFFF_FFFF followed an empty link to block -1).
  var rip: UInt64 = 1 << 63
  var block: Int32 = -1
  var first: Int32 = 0
  var count: Int32 = 0
  /// 0 when the target's code is fetched through global translations only (a CR3 write keeps
  /// its mapping), else the `CPU.addressSpaceGeneration` the link was made under.
  var addressSpace: UInt32 = 0

  /// Whether the link leads to the block at linear `fetchAddress` in address space
  /// `currentAddressSpace`.
  @_transparent
  func leads(to fetchAddress: UInt64, in currentAddressSpace: UInt32) -> Bool {
    rip == fetchAddress && (addressSpace == 0 || addressSpace == currentAddressSpace)
  }
}

/// One slot of the lookup table. The empty slot is all zeros (no block key is 0: its top byte
/// is the code size), so the table lives in zero-filled pages that cost nothing until a block
/// is entered in them (`allocateZeroedPages`).
struct BlockTableEntry {
  var key: UInt64 = 0
  var block: Int32 = 0
}

@_transparent
func blockSlot(_ key: UInt64) -> Int {
  Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> 48) & (blockTableSize - 1)
}

extension CPU {
  /// Physical address of the instruction byte at linear `linear`, through the fetch TLB.
  @_transparent
  func fetchPhysical(_ linear: UInt64) throws(Fault) -> UInt64 {
    let entry = fetchTLB[tlbIndex(linear)]
    if entry.tag == (linear & ~0xFFF) | tlbTagExtra {
      return linear &+ entry.delta
    }
    return try fetchPhysicalSlow(linear)
  }

  @inline(never)
  func fetchPhysicalSlow(_ linear: UInt64) throws(Fault) -> UInt64 {
    if promoteVictim(fetchTLB, linear) {
      return linear &+ fetchTLB[tlbIndex(linear)].delta
    }
    let physical = try translate(linear, access: .execute)
    guard ramPointer(physical) != nil else {
      throw .pageFault(pageFaultErrorCode(access: .execute), address: linear)
    }
    fillTLB(fetchTLB, linear: linear, target: physical & ~0xFFF)
    return physical
  }

  /// The block starting at linear `linear` (decoding it if needed).
  @_transparent
  func findBlock(_ linear: UInt64) throws(Fault) -> Int {
    let physical = try fetchPhysical(linear)
    let key = physical | UInt64(codeSize) << 56
    let slot = blockSlot(key)
    let entry = blockTable[slot]
    if entry.key == key {
      let block = Int(entry.block)
      let second = blocks[block].secondPage
      if second == .max { return block }
      // A page-crossing block is valid only if the next linear page still maps the same page.
      if let next = try? fetchPhysical((linear & ~0xFFF) &+ 0x1000), next >> 12 == second {
        return block
      }
    }
    return try buildBlock(linear, key: key, slot: slot)
  }

  /// The block decoded for `key` that is current (in the block table), if any.
  func currentBlock(key: UInt64) -> Int? {
    let entry = blockTable[blockSlot(key)]
    return entry.key == key ? Int(entry.block) : nil
  }

  @inline(never)
  func buildBlock(_ linear: UInt64, key: UInt64, slot: Int) throws(Fault) -> Int {
    if arenaUsed + maximumBlockInstructions > blockArenaCapacity || blockCount == maximumBlocks {
      statistics.arenaFullFlushes += 1
      flushDecodedBlocks()
    }
    var fetch = CodeFetch()
    let first = arenaUsed
    var pc = linear
    var count = 0
    while true {
      var instruction: Instruction
      do {
        instruction = try decodeInstruction(at: pc, &fetch)
      } catch {
        if count == 0 { throw error }
        break
      }
      instruction.selectFastForm()
      (blockArena + first + count).initialize(to: instruction)
      count += 1
      pc &+= UInt64(instruction.length)
      if instruction.op.endsBlock || count == maximumBlockInstructions || (pc ^ linear) & ~0xFFF != 0 {
        break
      }
    }
    arenaUsed += count
    statistics.blocksDecoded += 1
    let index = blockCount
    blockCount += 1
    let firstPage = fetch.firstPhysicalPage
    let secondPage = fetch.secondPhysicalPage
    blocks[index] = DecodedBlock(
      key: key, first: Int32(first), count: Int32(count), firstPage: firstPage, secondPage: secondPage,
      nextOnFirstPage: linkCodePage(firstPage, block: index),
      nextOnSecondPage: secondPage == .max ? 0 : linkCodePage(secondPage, block: index))
    blockTable[slot] = BlockTableEntry(key: key, block: Int32(index))
    return index
  }

  /// Makes `block` the head of `page`'s list; returns the previous head.
  func linkCodePage(_ page: UInt64, block: Int) -> Int32 {
    let previous = codePageHead[Int(page)]
    if previous == 0, let host = ramPointer(page << 12) {
      dropWriteEntries(hostPage: host)
    }
    codePageHead[Int(page)] = Int32(block + 1)
    // Published before the epoch, which siblings read with acquire ordering.
    if previous == 0 && !siblings.isEmpty { noteNewCodePage() }
    return previous
  }

  /// Forgets every block decoded from physical page `page` (a store hit it).
  @inline(never)
  func invalidateCodePage(_ page: UInt64) {
    var link = codePageHead[Int(page)]
    codePageHead[Int(page)] = 0
    statistics.codePageInvalidations += 1
    while link != 0 {
      let index = Int(link - 1)
      let block = blocks[index]
      let slot = blockSlot(block.key)
      if blockTable[slot].block == Int32(index) {
        blockTable[slot] = BlockTableEntry()
      }
      link = block.firstPage == page ? block.nextOnFirstPage : block.nextOnSecondPage
    }
    blockInvalidated = true
    chainGeneration &+= 1
  }

  /// Drops every decoded block (arena full, or a global code change).
  public func flushDecodedBlocks() {
    statistics.decodedBlockFlushes += 1
    // Every filled table slot belongs to one of the blocks decoded since the last flush: with
    // few of them, clearing their slots is cheaper than clearing the table.
    let clearSlots = blockCount <= blockTableSize / 16
    for index in 0..<blockCount {
      let block = blocks[index]
      codePageHead[Int(block.firstPage)] = 0
      if block.secondPage != .max { codePageHead[Int(block.secondPage)] = 0 }
      if clearSlots { blockTable[blockSlot(block.key)] = BlockTableEntry() }
    }
    if !clearSlots { releasePages(UnsafeMutableRawPointer(blockTable), byteCount: blockTableBytes) }
    translator?.flush(blocks: blocks, count: 0)
    blockCount = 0
    arenaUsed = 0
    blockInvalidated = true
    chainGeneration &+= 1
  }
}

extension CPU {
  /// Instructions held in the decoded-block arena.
  var decodedInstructionCount: Int { arenaUsed }

  /// Drops every decoded block and translation, as `flushDecodedBlocks` does, and gives the
  /// memory that held them back to the host (the arena, the block list and the code buffer
  /// read as untouched pages again). For an idle vCPU (`IdleCodeTrim`): a booted guest that
  /// waits keeps only the little code it runs while waiting, where the boot's run-once code
  /// filled tens of MiB. Call it on the vCPU's thread, between blocks.
  public func releaseDecodedCode() {
    statistics.idleTrims += 1
    flushDecodedBlocks()
    releasePages(UnsafeMutableRawPointer(blockArena), byteCount: blockArenaCapacity * MemoryLayout<Instruction>.stride)
    releasePages(UnsafeMutableRawPointer(blocks), byteCount: maximumBlocks * MemoryLayout<DecodedBlock>.stride)
    releasePages(UnsafeMutableRawPointer(blockTable), byteCount: blockTableBytes)
    translator?.releaseCodeMemory()
  }
}

/// Gives the whole pages inside `byteCount` bytes at `start` back to the host
/// (MADV_DONTNEED: private anonymous memory then reads as zeros and costs nothing until
/// touched). Only for memory whose contents are dead and whose type needs no clean-up: the
/// decoded instructions and blocks are plain values, and the arena and list are rewritten
/// before they are read again.
func releasePages(_ start: UnsafeMutableRawPointer, byteCount: Int) {
  let pageSize = 4096
  let address = Int(bitPattern: start)
  let first = (address + pageSize - 1) & ~(pageSize - 1)
  let end = (address + byteCount) & ~(pageSize - 1)
  guard end > first, let page = UnsafeMutableRawPointer(bitPattern: first) else { return }
  madvise(page, end - first, MADV_DONTNEED)
}

/// The bytes of the block lookup table.
let blockTableBytes = blockTableSize * MemoryLayout<BlockTableEntry>.stride

/// `count` values of `T` in fresh private anonymous pages: all-zero bytes that cost nothing
/// until touched, and that `releasePages` returns to. Only for plain types whose all-zero value
/// is valid. Free with `freeZeroedPages`.
func allocateZeroedPages<T>(_ type: T.Type, count: Int) -> UnsafeMutablePointer<T> {
  let bytes = count * MemoryLayout<T>.stride
  let mapping = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
  precondition(mapping != MAP_FAILED && mapping != nil, "cannot map \(bytes) bytes")
  return mapping!.bindMemory(to: T.self, capacity: count)
}

/// Unmaps memory from `allocateZeroedPages`.
func freeZeroedPages<T>(_ pointer: UnsafeMutablePointer<T>, count: Int) {
  munmap(pointer, count * MemoryLayout<T>.stride)
}

/// When an idle vCPU releases its decoded code (`CPU.releaseDecodedCode`). Checked each time
/// the vCPU is about to sleep in HLT: once a window of `window` nanoseconds has passed, the
/// vCPU counts as idle if it retired fewer than `idleInstructions` in it (a waiting Linux guest
/// retires a few hundred thousand a second; a busy one hundreds of millions), and it releases
/// its code when the arena holds at least `minimumDecodedInstructions` (what an idle guest
/// decodes again stays below that, so a guest that stays idle releases once). The environment
/// variable `HOSTVISOR_SOFTCPU_IDLE_RELEASE=off` turns it off (the caches then fill once and
/// stay, as a test that looks for leaks in the VMM's resident memory needs).
struct IdleCodeTrim {
  /// Whether idle vCPUs release their code (not `HOSTVISOR_SOFTCPU_IDLE_RELEASE=off`).
  static let enabled = getenv("HOSTVISOR_SOFTCPU_IDLE_RELEASE").map { String(cString: $0) != "off" } ?? true

  /// The length of one observation window (virtual nanoseconds of the machine's clock).
  static let window: UInt64 = 5_000_000_000
  /// Fewer instructions than this in a window: the vCPU was idle.
  static let idleInstructions: UInt64 = 20_000_000
  /// The smallest arena worth releasing (about 1.5 MiB of decoded instructions).
  static let minimumDecodedInstructions = 32_768

  private var windowStart: UInt64?
  private var retiredAtWindowStart: UInt64 = 0

  /// Whether to release now, at machine time `now`, with `retired` instructions retired so far
  /// and `decoded` instructions in the arena. Starts a new window whenever one has passed.
  mutating func shouldRelease(now: UInt64, retired: UInt64, decoded: Int) -> Bool {
    guard Self.enabled else { return false }
    guard let start = windowStart, now >= start else {
      windowStart = now
      retiredAtWindowStart = retired
      return false
    }
    guard now - start >= Self.window else { return false }
    let idle = retired &- retiredAtWindowStart < Self.idleInstructions
    windowStart = now
    retiredAtWindowStart = retired
    return idle && decoded >= Self.minimumDecodedInstructions
  }
}

/// Writes posted by other threads (`CPU.postExternalWrite`), waiting for the vCPU thread.
struct PostedExternalWrites {
  /// Most ranges kept; beyond that the vCPU drops every decoded block instead.
  static let capacity = 256
  var ranges: [(physical: UInt64, length: UInt64)] = []
  var overflowed = false
}

extension CPU {
  /// Tells the CPU that guest-physical `[physical, physical + length)` was written behind its
  /// back: decoded code from those pages is dropped. Call it on the vCPU's own thread or while
  /// the CPU is not running (loaders, tests); from other threads use `postExternalWrite`.
  public func noteExternalWrite(physical: UInt64, length: UInt64) {
    guard length > 0 else { return }
    var page = physical >> 12
    let last = (physical &+ length &- 1) >> 12
    while page <= last && page < codePageCount {
      if codePageHead[Int(page)] != 0 { invalidateCodePage(page) }
      page += 1
    }
  }
}

// Device DMA (other threads). A device thread may write guest RAM while the vCPU runs, so it
// cannot touch the block cache itself. `postExternalWrite` looks (without synchronisation, as
// a hint) whether a written page holds decoded code; only then it queues the range and raises
// `stopFlag`. `run` sees the flag at its next block boundary, applies the queued ranges and
// returns `.stopRequested`. A device queues the range before it publishes the used-ring entry
// (release), so a guest that saw the completion and then jumps to the new code ends its block
// at that jump and finds the flag first. The hint can miss only a block decoded concurrently
// with the DMA into the same page, i.e. a guest executing a buffer it handed to the device.

extension CPU {
  /// Thread-safe form of `noteExternalWrite` for writes made by another thread while this CPU
  /// may be running (device DMA through `GuestMemoryWriteObserver`). Ranges that touch a page
  /// with decoded code are queued and applied by `run` at its next block boundary (which then
  /// returns `.stopRequested`); others cost a few loads.
  public func postExternalWrite(physical: UInt64, length: UInt64) {
    guard length > 0, mayHoldDecodedCode(physical: physical, length: length) else { return }
    postedExternalWrites.withLock { posted in
      if posted.ranges.count < PostedExternalWrites.capacity {
        posted.ranges.append((physical, length))
      } else {
        posted.overflowed = true
      }
    }
    requestStop()
  }

  /// Whether any page of the range heads a list of decoded blocks (read as a hint from any thread).
  func mayHoldDecodedCode(physical: UInt64, length: UInt64) -> Bool {
    var page = physical >> 12
    let last = (physical &+ length &- 1) >> 12
    while page <= last && page < codePageCount {
      if codePageHead[Int(page)] != 0 { return true }
      page += 1
    }
    return false
  }

  /// Applies the writes other threads posted (vCPU thread).
  @inline(never)
  func applyPostedExternalWrites() {
    postedExternalWrites.withLock { posted in
      if posted.overflowed {
        statistics.postedWriteOverflows += 1
        flushDecodedBlocks()
      } else {
        for range in posted.ranges { noteExternalWrite(physical: range.physical, length: range.length) }
      }
      posted.ranges.removeAll(keepingCapacity: true)
      posted.overflowed = false
    }
    if !siblings.isEmpty { synchronizeCodeWithSiblings() }
  }
}
