import VMCore

/// Machine-state operations of the control interface: snapshots, restore and live migration.
/// The HTTP frontends and `hostvisor ctl` call these.
extension VMController {
  /// Writes a snapshot of a paused machine: its device and vCPU state to `statePath` and guest
  /// RAM to `memoryPath` (only pages written since the last snapshot when `diff` is true).
  public func createSnapshot(statePath: String, memoryPath: String, diff: Bool = false) throws(ControlError) {
    guard !diff else { throw ControlError(.unsupported, "diff snapshots are not implemented yet") }
    guard lifecycle == .paused, let machine else {
      throw ControlError(.invalidState, "cannot create a snapshot of a microVM that is \(lifecycle.phrase)")
    }
    do {
      try machine.saveSnapshot(
        statePath: statePath, memoryPath: memoryPath, networkIDs: spec.networkInterfaces.map(\.id))
    } catch {
      throw ControlError(.failed, error.description)
    }
  }

  /// Builds the machine from a snapshot instead of booting it (only before start); resumes it
  /// when `resume` is true, else leaves it paused. A configured accelerator other than `auto`
  /// restores on that accelerator, converting a snapshot taken on the other one. `networkOverrides` maps interface IDs to
  /// host TAP devices that replace the ones recorded in the snapshot.
  public func loadSnapshot(
    statePath: String, memoryPath: String, resume: Bool, networkOverrides: [String: String] = [:]
  ) throws(ControlError) {
    guard lifecycle == .notStarted else {
      throw ControlError(.invalidState, "a snapshot can only be loaded before the microVM has started")
    }
    var overrides = RestoreOverrides()
    overrides.memoryPath = memoryPath
    overrides.networkTaps = networkOverrides
    overrides.paused = !resume
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
    try adopt(machine, paused: !resume)
  }

  /// Moves the running machine to a Hostvisor process waiting at `destination`
  /// (`unix:PATH` or `tcp:HOST:PORT`); the source stops once the destination confirms.
  public func sendMigration(to destination: String, downtimeLimitMilliseconds: Int = 300) throws(ControlError) {
    throw ControlError(.unsupported, "live migration is not implemented yet")
  }

  /// Waits at `source` (`unix:PATH` or `tcp:HOST:PORT`) for a migrating machine and runs it.
  public func receiveMigration(from source: String) throws(ControlError) {
    throw ControlError(.unsupported, "live migration is not implemented yet")
  }
}
