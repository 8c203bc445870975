import Glibc
import Synchronization
import VMCore

/// Where the bytes a guest transmits through a UART go.
///
/// A UART calls `write` with its own lock held, so calls arrive one at a time and in guest order;
/// an implementation must not call back into the UART from `write` (host input reaches the UART
/// through `SerialPort.receive(_:)`, from any other context).
public protocol SerialBackend: AnyObject, Sendable {
  /// Sends bytes the guest transmitted to the host side.
  func write(_ bytes: UnsafeRawBufferPointer)

  /// Whether the backend takes more bytes now. While it does not, a UART reports its
  /// transmitter busy; bytes written anyway may be lost.
  var isReadyToTransmit: Bool { get }

  /// Sets what the backend calls (from any thread, with none of its locks held) when it is
  /// ready again after `isReadyToTransmit` or `hasRoom(for:)` answered false.
  func whenReadyToTransmit(_ handler: @escaping @Sendable () -> Void)

  /// Whether `count` more bytes fit now, none of them lost. While they do not, a device that
  /// can wait (a virtqueue) leaves its output where it is until the ready handler runs.
  func hasRoom(for count: Int) -> Bool
}

extension SerialBackend {
  /// Always ready: `write` takes every byte at once.
  public var isReadyToTransmit: Bool { true }

  public func whenReadyToTransmit(_ handler: @escaping @Sendable () -> Void) {}

  /// Always: `write` takes every byte at once.
  public func hasRoom(for count: Int) -> Bool { true }
}

/// Why a serial backend could not be opened.
public enum SerialBackendError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The output file could not be opened for appending.
  case cannotOpen(path: String, errno: Int32)
  /// The writer thread of a buffered backend could not be started.
  case cannotStartWriter(errno: Int32)

  public var description: String {
    switch self {
    case .cannotOpen(let path, let err):
      return "cannot open serial output file '\(path)': \(String(cString: strerror(err)))"
    case .cannotStartWriter(let err):
      return "cannot start the serial output writer: \(String(cString: strerror(err)))"
    }
  }
}

/// Sends guest output to a host file descriptor, by default standard output (the terminal).
/// Host input for the UART comes from a `TerminalConsole`.
public final class StdioSerialBackend: SerialBackend {
  /// The descriptor written to.
  public let fileDescriptor: Int32

  /// Writes to `fileDescriptor` (standard output unless told otherwise); the descriptor is not closed.
  public init(fileDescriptor: Int32 = STDOUT_FILENO) {
    self.fileDescriptor = fileDescriptor
  }

  public func write(_ bytes: UnsafeRawBufferPointer) {
    writeFully(fd: fileDescriptor, bytes)
  }
}

/// Discards guest output (`--serial none`).
public final class NullSerialBackend: SerialBackend {
  public init() {}
  public func write(_ bytes: UnsafeRawBufferPointer) {}
}

/// Keeps everything the guest transmitted in memory; for tests and tools.
public final class CapturingSerialBackend: SerialBackend {
  private let captured = Mutex<[UInt8]>([])

  public init() {}

  public func write(_ bytes: UnsafeRawBufferPointer) {
    captured.withLock { $0.append(contentsOf: bytes) }
  }

  /// Every byte written so far.
  public var bytes: [UInt8] { captured.withLock { $0 } }

  /// Every byte written so far, decoded as UTF-8 (invalid sequences replaced).
  public var text: String { String(decoding: bytes, as: UTF8.self) }
}
