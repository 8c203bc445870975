import VMCore

// Dirty-page tracking on the software CPU. Every store to guest RAM either hits a write-TLB
// entry or takes the slow path (`writableRAM`), which is the only place a write entry is
// filled; the system part (interrupt frames, descriptor and paging A/D bits) writes through
// `systemNoteWrite`, and device DMA through `GuestMemory.noteWrite`. All three mark the guest
// memory's `GuestDirtyBitmap`. So when logging is on, a page is marked when a write entry for
// it is filled, and taking the dirty pages drops every vCPU's write entries: the next store to
// any page takes the slow path again and marks it. When logging is off the cost is one relaxed
// load on the slow path.

extension CPU {
  /// Drops every write-TLB entry, so the next store to each page takes the slow path.
  public func dropAllWriteEntries() {
    writeTLB.update(repeating: TLBEntry(), count: tlbSlots)
  }
}

extension SoftAccelerator: DirtyPageTracking {
  /// Whether dirty logging is on.
  public var isDirtyLogging: Bool { parts.memory.dirtyPages.isEnabled }

  /// Turns dirty logging on and resets the log.
  public func startDirtyLogging() throws(MachinePauseError) {
    parts.memory.dirtyPages.setEnabled(true)
    _ = try takeDirtyPages()
  }

  /// The guest-physical page numbers written since logging started or since the previous call,
  /// ascending; resets the log. A running machine is paused for the moment it takes to swap
  /// the bitmap and drop the vCPUs' write-TLB entries (its clock is frozen meanwhile, so the
  /// guest does not see the pause); a paused machine stays paused.
  public func takeDirtyPages() throws(MachinePauseError) -> [UInt64] {
    let gate = parts.control.pauseGate
    let pausedHere = !gate.isPaused && !parts.control.isStopping && started.load(ordering: .acquiring)
    if pausedHere { try pause() }
    defer { if pausedHere { resume() } }
    let pages = parts.memory.dirtyPages.take()
    for cpu in cpus { cpu.dropAllWriteEntries() }
    return pages
  }

  /// Turns dirty logging off.
  public func stopDirtyLogging() {
    parts.memory.dirtyPages.setEnabled(false)
    _ = parts.memory.dirtyPages.take()
  }
}
