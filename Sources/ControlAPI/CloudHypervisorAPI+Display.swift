import Devices
import Glibc
import VMM

/// Body of `PUT /api/v1/vm.hostvisor-screenshot` (a Hostvisor extension).
struct HostvisorScreenshotConfig: Codable {
  /// `file://` URL of the PNG file to write.
  var destination_url: String
}

/// Body of `PUT /api/v1/vm.hostvisor-sendkey` (a Hostvisor extension): exactly one of `keys`
/// (a chord, key names joined by `-`, e.g. `ctrl-alt-del`) and `text` (typed key by key).
struct HostvisorSendKeyConfig: Codable {
  var keys: String?
  var text: String?
}

extension CloudHypervisorAPI {
  /// The machine when it is running or paused (booted by `vm.boot`, or by `hostvisor run
  /// --api-sock`); 405 otherwise.
  private func runningMachine() throws(Failure) -> VirtualMachine {
    let lifecycle = controller.lifecycle
    guard lifecycle == .running || lifecycle == .paused, let machine = controller.machine else {
      throw Failure(status: 405, message: "the VM is not running")
    }
    return machine
  }

  /// Writes the screen as a PNG file; 405 when the machine has no display.
  func screenshot(_ config: HostvisorScreenshotConfig) throws(Failure) {
    let path = try Self.directory(fromFileURL: config.destination_url)
    let machine = try runningMachine()
    guard let display = machine.display else {
      throw Failure(status: 405, message: "the VM has no display (start it with --display vnc=...)")
    }
    let png = display.screenshotPNG()
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else {
      throw Failure(status: 500, message: "cannot create \(path): \(String(cString: strerror(errno)))")
    }
    defer { close(fd) }
    var offset = 0
    while offset < png.count {
      let written = png.withUnsafeBytes { write(fd, $0.baseAddress! + offset, png.count - offset) }
      if written < 0 && errno == EINTR { continue }
      guard written > 0 else {
        throw Failure(status: 500, message: "cannot write \(path): \(String(cString: strerror(errno)))")
      }
      offset += written
    }
  }

  /// Presses a chord or types text on the i8042 keyboard.
  func sendKey(_ config: HostvisorSendKeyConfig) throws(Failure) {
    let machine = try runningMachine()
    switch (config.keys, config.text) {
    case (let keys?, nil):
      var keysyms: [UInt32] = []
      for name in keys.split(separator: "-", omittingEmptySubsequences: false) {
        guard let keysym = PS2ScanCodes.keysym(named: String(name)) else {
          throw Failure(status: 400, message: "unknown key '\(name)' in '\(keys)'")
        }
        keysyms.append(keysym)
      }
      machine.keyboardInput.pressChord(keysyms)
    case (nil, let text?):
      guard machine.keyboardInput.type(text) else {
        throw Failure(status: 400, message: "the text has a character without a key on a US keyboard")
      }
    default:
      throw Failure(status: 400, message: "give exactly one of keys and text")
    }
  }
}
