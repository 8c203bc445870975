import VMCore

/// Machine-state operations of the control interface: snapshots, restore and live migration.
/// The HTTP frontends and `hostvisor ctl` call these.
extension VMController {
  /// Writes a snapshot of a paused machine: its device and vCPU state to `statePath` and guest
  /// RAM to `memoryPath`. With `diff`, the memory file holds only the pages written since the
  /// previous snapshot (or since boot or restore), as a sparse file to lay over the previous
  /// snapshot's memory file; that needs dirty-page tracking (`VMSpec.trackDirtyPages`). With
  /// tracking on, every snapshot starts a new diff interval.
  public func createSnapshot(statePath: String, memoryPath: String, diff: Bool = false) throws(ControlError) {
    guard lifecycle == .paused, let machine else {
      throw ControlError(.invalidState, "cannot create a snapshot of a microVM that is \(lifecycle.phrase)")
    }
    let tracker = machine.accelerator as? any DirtyPageTracking
    let tracking = tracker?.isDirtyLogging ?? false
    if diff && !tracking {
      throw ControlError(
        .invalidState, "diff snapshots need dirty page tracking: enable track_dirty_pages in the machine configuration")
    }
    var dirtyPages: [UInt64] = []
    if let tracker, tracking {
      do {
        dirtyPages = try tracker.takeDirtyPages()
      } catch {
        throw ControlError(.failed, "cannot read the dirty pages: \(error)")
      }
    }
    do {
      try machine.saveSnapshot(
        statePath: statePath, memoryPath: memoryPath, networkIDs: spec.networkInterfaces.map(\.id),
        diffPages: diff ? dirtyPages : nil)
    } catch {
      // The pages stay dirty for the next snapshot.
      for page in dirtyPages { machine.parts.memory.dirtyPages.mark(page: page) }
      throw ControlError(.failed, error.description)
    }
  }

  /// Turns on dirty-page tracking for a booted or restored machine (diff snapshots).
  func startDirtyPageTracking(_ machine: VirtualMachine) throws(ControlError) {
    guard let tracker = machine.accelerator as? any DirtyPageTracking else {
      throw ControlError(.unsupported, "the \(machine.accelerator.name) accelerator cannot track dirty pages")
    }
    do {
      try tracker.startDirtyLogging()
    } catch {
      throw ControlError(.failed, "cannot start dirty page tracking: \(error)")
    }
  }

  /// Builds the machine from a snapshot instead of booting it (only before start); resumes it
  /// when `resume` is true, else leaves it paused. A configured accelerator other than `auto`
  /// restores on that accelerator, converting a snapshot taken on the other one. `networkOverrides` maps interface IDs to
  /// host TAP devices that replace the ones recorded in the snapshot.
  ///
  /// For a diff snapshot, `memoryPath` is its base (the previous full snapshot's memory file)
  /// and the diff memory file the state records is laid over it. With `trackDirtyPages`, the
  /// restored machine tracks dirty pages for diff snapshots. With `clockRealtime`, the guest's
  /// clocks step forward by the host wall-clock time since the snapshot was taken. With
  /// `eagerMemory`, the memory file is read into RAM before the guest runs instead of being
  /// mapped copy-on-write.
  public func loadSnapshot(
    statePath: String, memoryPath: String, resume: Bool, networkOverrides: [String: String] = [:],
    trackDirtyPages: Bool = false, clockRealtime: Bool = false, eagerMemory: Bool = false
  ) throws(ControlError) {
    guard lifecycle == .notStarted else {
      throw ControlError(.invalidState, "a snapshot can only be loaded before the microVM has started")
    }
    var overrides = RestoreOverrides()
    overrides.memoryPath = memoryPath
    overrides.networkTaps = networkOverrides
    overrides.paused = !resume
    overrides.clockRealtime = clockRealtime
    overrides.eagerMemory = eagerMemory
    let current = spec
    overrides.serial = current.serial
    overrides.verbose = current.verbose
    overrides.accelerator = current.accelerator
    let machine: VirtualMachine
    do {
      machine = try VirtualMachine.restore(statePath: statePath, overrides: overrides)
    } catch let error as MachineStateError {
      throw ControlError(.invalidArgument, error.description)
    } catch let error as MachineError {
      throw ControlError(.failed, error.description)
    } catch {
      throw ControlError(.failed, "\(error)")
    }
    if trackDirtyPages {
      do throws(ControlError) {
        try startDirtyPageTracking(machine)
      } catch {
        machine.shutdownDevices()
        throw error
      }
      try? configure { $0.trackDirtyPages = true }
    }
    try adopt(machine, paused: !resume)
  }
}
