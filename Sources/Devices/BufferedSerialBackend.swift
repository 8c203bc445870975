import Glibc
import VMCore

/// Sends guest output to a host descriptor through a bounded buffer that a writer thread of its
/// own drains, so a consumer that stops reading (a full pipe, a stopped terminal, a slow disk)
/// never stalls the vCPU that transmits, nor with it the VMM's pause, snapshot and shutdown,
/// which wait for the vCPUs.
///
/// While the buffer is full the backend is not ready (`isReadyToTransmit`): a UART then reports
/// its transmitter busy (LSR THRE and TEMT clear), so a driver that waits for THRE waits, and a
/// guest that transmits anyway loses those bytes (`droppedBytes`), as on a line whose far end
/// stopped listening. Once the writer has emptied half the buffer it calls the ready handler
/// (the UART's THR-empty interrupt).
///
/// What is buffered is still written when the backend is released (by its writer thread, which
/// then ends) and at process exit (an `atexit` hook that waits at most `exitDrainTimeout` for a
/// consumer that does not read).
///
/// The buffer and its thread are a `BoundedWriter` with back-pressure.
public final class BufferedSerialBackend: SerialBackend {
  /// Bytes buffered by default.
  public static let defaultCapacity = 1 << 16
  /// How long process exit waits for buffered output to be written.
  public static let exitDrainTimeout: Duration = BoundedWriter.exitDrainTimeout

  /// The buffer, the descriptor and the writer thread; the thread holds it until it ends, after
  /// the backend is released and the buffer is written.
  private let writer: BoundedWriter

  /// Writes to `fileDescriptor`, closing it when done if `ownsDescriptor` (also when this
  /// throws).
  public init(
    fileDescriptor: Int32, ownsDescriptor: Bool = false, capacity: Int = BufferedSerialBackend.defaultCapacity
  ) throws(SerialBackendError) {
    writer = BoundedWriter(
      fileDescriptor: fileDescriptor, ownsDescriptor: ownsDescriptor, capacity: capacity, whenFull: .backPressure)
    do {
      try writer.start()
    } catch {
      throw .cannotStartWriter(errno: error.errno)
    }
  }

  /// Appends guest output to `path`, created (mode 0644) if missing (`--serial file:PATH`).
  public convenience init(appendingTo path: String) throws(SerialBackendError) {
    let descriptor = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
    guard descriptor >= 0 else { throw .cannotOpen(path: path, errno: errno) }
    try self.init(fileDescriptor: descriptor, ownsDescriptor: true)
  }

  deinit { writer.finish() }

  public func write(_ bytes: UnsafeRawBufferPointer) { writer.write(bytes) }

  public var isReadyToTransmit: Bool { writer.hasRoom(for: 1) }

  public func hasRoom(for count: Int) -> Bool { writer.hasRoom(for: count) }

  public func whenReadyToTransmit(_ handler: @escaping @Sendable () -> Void) { writer.whenRoomReturns(handler) }

  /// Bytes the guest transmitted while the buffer was full, which were lost.
  public var droppedBytes: UInt64 { writer.droppedBytes }

  /// Waits until everything buffered is written, at most `timeout`; returns whether it was.
  @discardableResult
  public func drain(timeout: Duration) -> Bool { writer.drain(timeout: timeout) }
}
