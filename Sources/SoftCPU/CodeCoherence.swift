import Synchronization

// Cross-vCPU code coherence (SMP). Each vCPU has its own block cache and TLBs; a store by one
// vCPU to a page another one decoded code from must reach that one, as a store to its own
// code does (BlockCache.swift). Three rules, all applied at block boundaries through the
// posted-write queue that device DMA uses (`postExternalWrite`), so the hot path is unchanged
// and a machine with one vCPU pays nothing:
//
// 1. A store that takes the slow path to a page a sibling holds code on does not fill the
//    write TLB (every later store comes back), ends the block, and the page is posted to the
//    siblings after the store, at this vCPU's next block boundary (so a sibling that re-decodes
//    on receipt sees the new bytes).
// 2. A vCPU that starts decoding a page no block of its own came from bumps the machine's code
//    epoch and stops its siblings. Each sibling, at its next block boundary, drops its write-TLB
//    entries for pages siblings now hold code on, and posts those pages back: a store it made
//    through such an entry before dropping it may have raced the decode.
// 3. Reading `codePageHead` of a sibling is a hint (no synchronisation): a stale zero is
//    covered by rule 2's post-back, a stale nonzero only costs a slow store.
//
// This matches what x86 promises for cross-modifying code (SDM vol. 3, 9.1.3): the executing
// vCPU sees the new code no later than its next block boundary after the writer's store.

/// State the vCPUs of one machine share for code coherence.
final class SharedCodeState: Sendable {
  /// Bumped whenever a vCPU starts decoding code from a page it had no blocks on.
  let epoch = Atomic<UInt64>(0)
}

/// Another vCPU of the same machine (not retained: the accelerator owns every CPU).
struct SiblingCPU {
  unowned(unsafe) let cpu: CPU
}

extension CPU {
  /// Makes `cpus` (this CPU may be among them) the vCPUs of one machine, sharing code
  /// coherence. Call before any of them runs.
  public static func connectSiblings(_ cpus: [CPU]) {
    guard cpus.count > 1 else { return }
    let shared = SharedCodeState()
    for cpu in cpus {
      cpu.sharedCode = shared
      cpu.siblings = cpus.filter { $0 !== cpu }.map { SiblingCPU(cpu: $0) }
    }
  }

  /// Whether a sibling holds decoded code from physical `page` (a hint, see above).
  func siblingsHoldCode(_ page: UInt64) -> Bool {
    siblings.contains { $0.cpu.mayHoldDecodedCode(physical: page << 12, length: 0x1000) }
  }

  /// Tells every sibling that physical `page` was written (each one checks its own code).
  func postPageToSiblings(_ page: UInt64) {
    for sibling in siblings { sibling.cpu.postExternalWrite(physical: page << 12, length: 0x1000) }
  }

  /// Rule 1: a slow-path store is about to hit `page`, which a sibling holds code on.
  @inline(never)
  func noteStoreToSiblingCode(_ page: UInt64) {
    if deferredSiblingPages.last != page { deferredSiblingPages.append(page) }
    blockInvalidated = true
    requestStop()
  }

  /// Rule 2: this CPU just linked its first block on `page`.
  @inline(never)
  func noteNewCodePage() {
    guard let shared = sharedCode else { return }
    shared.epoch.add(1, ordering: .releasing)
    for sibling in siblings { sibling.cpu.requestStop() }
  }

  /// Runs at a block boundary (from `applyPostedExternalWrites`), outside any lock.
  @inline(never)
  func synchronizeCodeWithSiblings() {
    for page in deferredSiblingPages { postPageToSiblings(page) }
    deferredSiblingPages.removeAll(keepingCapacity: true)
    guard let shared = sharedCode else { return }
    let epoch = shared.epoch.load(ordering: .acquiring)
    guard epoch != seenCodeEpoch else { return }
    seenCodeEpoch = epoch
    for index in 0..<tlbSlots where writeTLB[index].tag != tlbInvalidTag {
      let entry = writeTLB[index]
      let host = (entry.tag & ~0xFFF) &+ entry.delta
      guard let page = physicalPage(ofHost: host), siblingsHoldCode(page) else { continue }
      writeTLB[index] = TLBEntry()
      postPageToSiblings(page)
    }
  }

  /// The guest-physical page of a host address inside guest RAM.
  func physicalPage(ofHost host: UInt64) -> UInt64? {
    for index in 0..<ramRegionCount {
      let region = ramRegions[index]
      let offset = host &- UInt64(UInt(bitPattern: region.host))
      if offset < region.size { return (region.guestBase &+ offset) >> 12 }
    }
    return nil
  }
}
