import PCI
import Synchronization

/// A network device that emulates real hardware (the e1000, the RTL8139) on a
/// `NetworkBackend`, for guests without virtio drivers.
public protocol EmulatedNetworkDevice: PCIDevice, CountingDevice {
  /// The model as logs and messages name it, e.g. "e1000 (82540EM)".
  var modelDescription: String { get }
  /// The device's MAC address.
  var mac: MACAddress { get }
  /// The host side.
  var backend: any NetworkBackend { get }
  /// Stops the device's worker thread.
  func shutdown()
}

extension E1000: EmulatedNetworkDevice {
  public var modelDescription: String { "e1000 (82540EM)" }
}

/// What an emulated NIC did with the frame waiting in its receive buffer.
enum FrameDelivery {
  /// Written into the guest's receive ring or buffer.
  case delivered
  /// Filtered out or too long: gone.
  case dropped
  /// The guest left no room for it: it stays pending until the driver makes room.
  case noRoom
}

/// How a receive pass (`receivePendingFrames`) ended.
struct ReceivePass {
  /// At least one frame reached the guest (the device raises its receive interrupt).
  var delivered = false
  /// A frame is kept for lack of room: the device polls the backend again only once the
  /// driver makes room (`wantsInput` is false).
  var stalled = false
}

/// The emulated NICs' receive loop: takes frames from `backend` into `buffer` (a vnet header
/// of `headerSize` bytes, then the frame; `state[keyPath: pending]` is the bytes waiting
/// there, 0 for none) and hands each to `deliver`, until the backend has nothing more or the
/// guest has no room. Sets `wantsInput` to whether the worker should wake for more input.
func receivePendingFrames<State>(
  _ state: inout State, pending: WritableKeyPath<State, Int>, buffer: UnsafeMutableRawBufferPointer,
  headerSize: Int, from backend: any NetworkBackend, wantsInput: borrowing Atomic<Bool>,
  deliver: (inout State) -> FrameDelivery
) -> ReceivePass {
  var pass = ReceivePass()
  while true {
    if state[keyPath: pending] == 0 {
      let count = backend.receive(into: buffer)
      guard count > headerSize else {
        if count == 0 { break } else { continue }
      }
      state[keyPath: pending] = count
    }
    switch deliver(&state) {
    case .delivered: pass.delivered = true
    case .dropped: break
    case .noRoom:
      pass.stalled = true
      wantsInput.store(false, ordering: .releasing)
      return pass
    }
  }
  wantsInput.store(true, ordering: .releasing)
  return pass
}
