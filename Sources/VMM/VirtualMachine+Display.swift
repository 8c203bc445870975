import Devices
import Display
import Glibc
import Loaders
import PCI
import Synchronization
import VMCore
import Virtio

/// A machine's screen: the display PCI function, its framebuffer and the VNC server.
public final class MachineDisplay: Sendable {
  /// The pixels the guest draws.
  public let framebuffer: Framebuffer
  /// The PCI function whose BAR 0 is the framebuffer.
  public let device: DisplayPCIDevice
  private let listenAddress: String
  private let server = Mutex<VNCServer?>(nil)

  init(framebuffer: Framebuffer, device: DisplayPCIDevice, listenAddress: String) {
    self.framebuffer = framebuffer
    self.device = device
    self.listenAddress = listenAddress
  }

  /// What Linux is told about the framebuffer (boot_params' screen_info).
  var screenInfo: LinuxScreenInfo {
    LinuxScreenInfo(
      base: framebuffer.guestAddress, size: UInt64(framebuffer.size), width: framebuffer.width,
      height: framebuffer.height, lineLength: framebuffer.stride)
  }

  /// The VNC server, once started.
  public var vncServer: VNCServer? { server.withLock { $0 } }

  /// The current screen as a PNG file's bytes.
  public func screenshotPNG() -> [UInt8] {
    PNGEncoder.encode(
      xrgb: framebuffer.copyImage(), width: framebuffer.width, height: framebuffer.height,
      stride: framebuffer.width * Framebuffer.bytesPerPixel)
  }

  /// Starts the VNC server: key events go to `keyboard`, pointer events to `tablet` (if any),
  /// scaled from the framebuffer's size.
  func startServer(keyboard: PS2KeyboardInput, tablet: VirtioTablet?) throws(MachineError) {
    let started: VNCServer
    let framebuffer = self.framebuffer
    do {
      started = try VNCServer(
        framebuffer: framebuffer, listenAddress: listenAddress,
        input: VNCInputHandlers(
          key: { keysym, down in keyboard.keysymEvent(keysym, down: down) },
          pointer: { x, y, buttons in
            tablet?.pointer(x: x, y: y, buttons: buttons, width: framebuffer.width, height: framebuffer.height)
          }))
    } catch {
      throw MachineError(error.description)
    }
    server.withLock { $0 = started }
    DiagnosticOutput.standardError.write("hostvisor: VNC server listening on \(started.address)")
  }

  func stop() {
    server.withLock { $0 }?.stop()
  }
}

extension VirtualMachine {
  /// Attaches the display function (after the virtio devices) and maps its framebuffer at the
  /// address the bus gave BAR 0, when the configuration asks for a display.
  static func attachDisplay(
    configuration: MachineConfiguration, pci: PCIBus, memory: GuestMemory
  ) throws(MachineError) -> MachineDisplay? {
    guard case .vnc(let address, _) = configuration.display else { return nil }
    let width = DisplayGeometry.width
    let height = DisplayGeometry.height
    let size = Framebuffer.memorySize(width: width, height: height)
    let device = DisplayPCIDevice(framebufferSize: size)
    do {
      try pci.attach(device)
    } catch {
      throw MachineError("cannot attach the display: \(error)")
    }
    let framebuffer: Framebuffer
    do {
      framebuffer = try Framebuffer(
        memory: memory, guestAddress: device.framebufferAddress, width: width, height: height, size: size)
    } catch {
      throw MachineError("cannot map the framebuffer: \(error)")
    }
    device.attach(framebuffer: framebuffer)
    return MachineDisplay(framebuffer: framebuffer, device: device, listenAddress: address)
  }
}
