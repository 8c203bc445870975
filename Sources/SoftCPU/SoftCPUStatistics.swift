import Glibc

/// Counters of one vCPU's decoded-block cache and translating tier: what a profile needs to
/// tell cold code from churn (docs/softcpu-performance.md, "How to profile"). Kept always (each
/// is bumped on a slow path, `interpretedInstructions` once per block run); printed to standard
/// error when the vCPU's thread ends if the environment variable HOSTVISOR_SOFTCPU_STATS is set.
public struct SoftCPUStatistics: Sendable, Equatable {
  /// Blocks decoded into the arena.
  public var blocksDecoded = 0
  /// Full flushes of the decoded blocks, for any reason (also a reset, a restored state or a
  /// tier change).
  public var decodedBlockFlushes = 0
  /// Of those, flushes because the arena or the block list was full.
  public var arenaFullFlushes = 0
  /// Of those, flushes because device threads wrote more code-holding ranges than the queue of
  /// posted writes keeps while the vCPU was not at a block boundary (a halted vCPU).
  public var postedWriteOverflows = 0
  /// Stores (or device writes) that hit a page holding decoded code, whose blocks were dropped.
  public var codePageInvalidations = 0
  /// Flushes of every translation because the code buffer was full.
  public var codeBufferFlushes = 0
  /// Of the decoded-block flushes, those of an idle vCPU that gave the memory of its decoded
  /// blocks and translations back to the host (`IdleCodeTrim`).
  public var idleTrims = 0
  /// Blocks the run loop dispatched (a chain of translated blocks counts once).
  public var blockDispatches = 0
  /// Software-TLB flushes of the whole table (CR3 and paging-mode writes; a CR3 write keeps
  /// global translations).
  public var fullTLBFlushes = 0
  /// Software-TLB flushes of one page (INVLPG).
  public var pageTLBFlushes = 0
  /// Page-table walks (software-TLB misses on paged memory).
  public var pageWalks = 0
  /// Instructions the interpreter executed (the rest of `retiredInstructions` ran translated).
  public var interpretedInstructions: UInt64 = 0

  /// Whether HOSTVISOR_SOFTCPU_STATS asks for the report.
  static let reportRequested = getenv("HOSTVISOR_SOFTCPU_STATS") != nil
}

extension CPU {
  /// One line of counters for the vCPU numbered `index`.
  public func statisticsReport(index: Int) -> String {
    let counts = statistics
    return "softcpu vcpu\(index): retired \(retiredInstructions), interpreted \(counts.interpretedInstructions),"
      + " blocks decoded \(counts.blocksDecoded), decoded-block flushes \(counts.decodedBlockFlushes)"
      + " (arena full \(counts.arenaFullFlushes), posted writes \(counts.postedWriteOverflows)),"
      + " code-page invalidations \(counts.codePageInvalidations), blocks translated \(translatedBlockCount),"
      + " direct links \(translator?.linkedSites ?? 0) + \(translator?.lateLinkedSites ?? 0) late,"
      + " code-buffer flushes \(counts.codeBufferFlushes), idle trims \(counts.idleTrims), block dispatches \(counts.blockDispatches),"
      + " TLB flushes \(counts.fullTLBFlushes) + \(counts.pageTLBFlushes) pages, page walks \(counts.pageWalks)"
  }
}
