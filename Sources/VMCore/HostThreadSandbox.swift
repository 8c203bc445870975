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
