import Foundation
import Synchronization
import VMCore

/// Captures every byte written to its port (a serial transmit register, minus the UART).
final class ByteSink: PortIODevice {
  private let bytes = Mutex<[UInt8]>([])
  var captured: [UInt8] { bytes.withLock { $0 } }
  var text: String { String(decoding: captured, as: UTF8.self) }
  func portRead(port: UInt16, size: Int) -> UInt32 { 0 }
  func portWrite(port: UInt16, size: Int, value: UInt32) {
    bytes.withLock { $0.append(UInt8(truncatingIfNeeded: value)) }
  }
}

/// isa-debug-exit style: a write of `value` stops the machine with `.debugExit(value:)`.
final class DebugExitDevice: PortIODevice {
  let control: MachineControl
  init(control: MachineControl) { self.control = control }
  func portRead(port: UInt16, size: Int) -> UInt32 { 0 }
  func portWrite(port: UInt16, size: Int, value: UInt32) {
    control.requestStop(.debugExit(value: value))
  }
}

/// Records every (size, value) written to it; reads return zero.
final class WriteRecorder: PortIODevice {
  struct Write: Equatable, CustomStringConvertible {
    let size: Int
    let value: UInt32
    var description: String { "\(size)-byte 0x\(String(value, radix: 16))" }
  }
  private let writes = Mutex<[Write]>([])
  var recorded: [Write] { writes.withLock { $0 } }
  /// Just the values, for reports of one 32-bit word each.
  var values: [UInt32] { recorded.map(\.value) }
  func portRead(port: UInt16, size: Int) -> UInt32 { 0 }
  func portWrite(port: UInt16, size: Int, value: UInt32) {
    writes.withLock { $0.append(Write(size: size, value: value)) }
  }
}

/// Reads return `value` truncated to the access size.
final class ValueSource: PortIODevice {
  let value: UInt32
  init(value: UInt32) { self.value = value }
  func portRead(port: UInt16, size: Int) -> UInt32 {
    size >= 4 ? value : value & ((1 << UInt32(size * 8)) - 1)
  }
  func portWrite(port: UInt16, size: Int, value: UInt32) {}
}

/// Each read returns the next of 0x0101, 0x0202, 0x0303, ...
final class Counter: PortIODevice {
  private let next = Mutex<UInt32>(1)
  func portRead(port: UInt16, size: Int) -> UInt32 {
    next.withLock { count in
      defer { count += 1 }
      return count * 0x0101
    }
  }
  func portWrite(port: UInt16, size: Int, value: UInt32) {}
}

/// A write signals `ready` (the guest telling the test it may act).
final class ReadyFlag: PortIODevice {
  let ready = DispatchSemaphore(value: 0)
  func portRead(port: UInt16, size: Int) -> UInt32 { 0 }
  func portWrite(port: UInt16, size: Int, value: UInt32) { ready.signal() }
}

/// A small MMIO register file:
/// - offset 0x00 (4 bytes): stores a 32-bit value; offset 0x04 reads it back byte-swapped;
/// - offset 0x08: a byte register;
/// - offset 0x0A (2 bytes): reads 0xBEEF;
/// - offset 0x10 (8 bytes): stores a 64-bit value; offset 0x18 reads it back byte-swapped.
/// Every access is logged.
final class TransformingMMIODevice: MMIODevice {
  struct Access: Equatable, CustomStringConvertible {
    let write: Bool
    let offset: UInt64
    let size: Int
    let value: UInt64
    var description: String {
      "\(write ? "write" : "read") \(size) bytes at +0x\(String(offset, radix: 16)): 0x\(String(value, radix: 16))"
    }
  }
  private struct State {
    var word: UInt32 = 0
    var byte: UInt8 = 0
    var quad: UInt64 = 0
    var log: [Access] = []
  }
  private let state = Mutex(State())
  var accesses: [Access] { state.withLock { $0.log } }

  func mmioRead(offset: UInt64, size: Int) -> UInt64 {
    state.withLock { state in
      let value: UInt64
      switch offset {
      case 0x04: value = UInt64(state.word.byteSwapped)
      case 0x08: value = UInt64(state.byte)
      case 0x0A: value = 0xBEEF
      case 0x18: value = state.quad.byteSwapped
      default: value = 0
      }
      state.log.append(Access(write: false, offset: offset, size: size, value: value))
      return value
    }
  }

  func mmioWrite(offset: UInt64, size: Int, value: UInt64) {
    state.withLock { state in
      state.log.append(Access(write: true, offset: offset, size: size, value: value))
      switch offset {
      case 0x00: state.word = UInt32(truncatingIfNeeded: value)
      case 0x08: state.byte = UInt8(truncatingIfNeeded: value)
      case 0x10: state.quad = value
      default: break
      }
    }
  }
}
