import Synchronization

/// The kinds of host thread a sandbox tells apart when it narrows what a thread may do.
public enum HostThreadKind: String, Sendable {
  /// A thread that runs one virtual CPU (KVM_RUN or the software CPU's loop).
  case vcpu
  /// A device's own worker thread (virtio queues, backends).
  case deviceWorker = "device worker"
}

/// Where a machine's host threads announce themselves when they start, so a sandbox (when one
/// is active) can install that thread kind's own restrictions on the thread itself.
public enum HostThreadSandbox {
  private static let hook = Mutex<(@Sendable (HostThreadKind) -> Void)?>(nil)

  /// Sets the closure every new vCPU and device thread calls on itself when it starts.
  public static func setThreadStartHook(_ body: @escaping @Sendable (HostThreadKind) -> Void) {
    hook.withLock { $0 = body }
  }

  /// Called by a starting thread of `kind`, on that thread.
  public static func threadStarted(_ kind: HostThreadKind) {
    hook.withLock { $0 }?(kind)
  }
}

/// The user and group a sandbox confined the VMM to, once it did: errors about host resources
/// the unprivileged VMM opens after entry (a TAP device) say what that user needs.
public enum HostSandboxIdentity {
  private static let value = Mutex<(uid: UInt32, gid: UInt32)?>(nil)

  /// The confining user and group; nil while the VMM is not sandboxed.
  public static var confined: (uid: UInt32, gid: UInt32)? { value.withLock { $0 } }

  /// Records the user and group the sandbox switched to.
  public static func record(uid: UInt32, gid: UInt32) {
    value.withLock { $0 = (uid, gid) }
  }
}

/// Where disk images announce the host device they live on when they are opened, so per-device
/// I/O limits (a cgroup's `io.max`) also cover disks a machine gets after start, through the API.
public enum HostDiskDevices {
  private static let hook = Mutex<(@Sendable (_ device: UInt64) -> String?)?>(nil)

  /// Sets the closure told about every disk image opened from now on: `device` is the block
  /// device itself or the one holding the file (`st_rdev` or `st_dev`); it returns why the disk
  /// must not be used, or nil.
  public static func setOpenHook(_ body: @escaping @Sendable (_ device: UInt64) -> String?) {
    hook.withLock { $0 = body }
  }

  /// Called when a disk image on `device` was opened; a reason to refuse it, or nil.
  public static func opened(device: UInt64) -> String? {
    hook.withLock { $0 }?(device)
  }
}
