import Glibc
import SoftCPU
import VMCore
import Virtio

extension GuestCPUModel {
  /// The x86-64 baseline ISA level (System V psABI): FPU ... CMOV, CLFSH, MMX, FXSR, SSE, SSE2,
  /// SYSCALL, NX, LM, with the TSC-deadline timer and the hypervisor bit; no SSE3 or later. The
  /// model for moving machines between accelerators where KVM lacks x86-64-v2 (nested KVMs
  /// that virtualize few extensions).
  public static let x86_64 = GuestCPUModel(
    name: "x86-64", summary: "the x86-64 baseline (SSE2): movable between accelerators on any KVM",
    features: CPUIDFeatures(
      leaf1EDX: x86_64_v2.features!.leaf1EDX, leaf1ECX: 1 << 24 | 1 << 31,
      extendedEDX: x86_64_v2.features!.extendedEDX, extendedECX: 0))

  /// The models `--cpu-model` offers, the software CPU's default first.
  public static let catalogue: [GuestCPUModel] = [.hostvisor, .x86_64_v3, .x86_64_v2, .x86_64, .host]

  /// The model named `name`; throws a one-line error listing the models for another name.
  public static func named(_ name: String) throws(ConfigurationError) -> GuestCPUModel {
    guard let model = catalogue.first(where: { $0.name == name }) else {
      throw .invalidCPUModel(name, known: catalogue.map(\.name))
    }
    return model
  }
}

/// Which CPU accelerator runs the guest.
public enum AcceleratorChoice: String, Sendable, CaseIterable {
  /// KVM when it is usable for the guest, the software CPU otherwise.
  case auto
  /// Linux KVM (`/dev/kvm`).
  case kvm
  /// Hostvisor's software x86-64 CPU.
  case soft
}

/// Where the guest's COM1 serial port goes.
public enum SerialChoice: Sendable, Equatable {
  /// The host terminal (raw mode while attached; Ctrl-A x quits).
  case stdio
  /// Appended to a file.
  case file(String)
  /// Discarded.
  case none

  /// Parses `stdio`, `file:PATH` or `none`.
  public init(parsing text: String) throws(ConfigurationError) {
    switch text {
    case "stdio": self = .stdio
    case "none": self = .none
    default:
      guard text.hasPrefix("file:"), text.count > 5 else { throw .invalidSerial(text) }
      self = .file(String(text.dropFirst(5)))
    }
  }
}

/// A virtio-blk disk backed by a raw image file.
public struct DiskConfiguration: Sendable, Equatable {
  /// The image file (or block device).
  public var path: String
  /// Whether the guest sees a read-only disk (the file is opened O_RDONLY).
  public var readOnly: Bool

  public init(path: String, readOnly: Bool = false) {
    self.path = path
    self.readOnly = readOnly
  }

  /// Parses `PATH` or `PATH,readonly` (the last comma-separated word may be `readonly`).
  public init(parsing text: String) throws(ConfigurationError) {
    var path = Substring(text)
    var readOnly = false
    if let comma = text.lastIndex(of: ",") {
      guard text[text.index(after: comma)...] == "readonly" else { throw .invalidDisk(text) }
      path = text[..<comma]
      readOnly = true
    }
    guard !path.isEmpty else { throw .invalidDisk(text) }
    self.init(path: String(path), readOnly: readOnly)
  }
}

/// What a virtio-net interface is connected to on the host.
public enum NetworkAttachment: Sendable, Equatable {
  /// A host TAP device (created when missing and the process may; not brought up).
  case tap(name: String)
  /// User-mode networking through a passt child process: DHCP, DNS, outbound TCP/UDP/ICMP
  /// echo and port forwards, with no privileges.
  case user(forwards: [PortForward])
}

/// The network device model the guest sees.
public enum NetworkDeviceModel: String, Sendable, Equatable, CaseIterable {
  /// virtio-net (the default: paravirtual, the fastest).
  case virtio
  /// An emulated Intel 82540EM (Linux `e1000`), for guests without virtio drivers.
  case e1000
  /// An emulated Realtek RTL8139C (Linux `8139too`), for guests without virtio drivers.
  case rtl8139
}

/// A network interface (its device model) and its host side.
public struct NetworkConfiguration: Sendable, Equatable {
  /// The host side of the interface.
  public var attachment: NetworkAttachment
  /// The device the guest sees.
  public var model: NetworkDeviceModel
  /// The guest's MAC address; nil picks a random 52:54:00:xx:xx:xx.
  public var mac: MACAddress?
  /// Whether the device offers checksum and TCP segmentation offloads to the guest on a TAP
  /// (`offloads=off` turns them off, e.g. to benchmark against a VMM with its offloads off).
  public var offloads: Bool

  /// The TAP interface name, or "" for user-mode networking.
  public var tapName: String {
    if case .tap(let name) = attachment { return name }
    return ""
  }

  public init(
    tapName: String, mac: MACAddress? = nil, offloads: Bool = true, model: NetworkDeviceModel = .virtio
  ) {
    self.init(attachment: .tap(name: tapName), mac: mac, offloads: offloads, model: model)
  }

  public init(
    attachment: NetworkAttachment, mac: MACAddress? = nil, offloads: Bool = true, model: NetworkDeviceModel = .virtio
  ) {
    self.attachment = attachment
    self.mac = mac
    self.offloads = offloads
    self.model = model
  }

  /// Parses `tap=NAME[,mac=MAC][,offloads=on|off][,model=virtio|e1000|rtl8139]` or
  /// `user[,hostfwd=tcp:[HOST]:PORT-:GUESTPORT]...[,mac=MAC][,model=virtio|e1000|rtl8139]` (keys after
  /// the first word in any order).
  public init(parsing text: String) throws(ConfigurationError) {
    var tapName: String?
    var user = false
    var forwards: [PortForward] = []
    var mac: MACAddress?
    var offloads: Bool?
    var model: NetworkDeviceModel?
    for (index, field) in text.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
      if index == 0 && field == "user" {
        user = true
        continue
      }
      guard let equals = field.firstIndex(of: "=") else { throw .invalidNetwork(text) }
      let key = field[..<equals]
      let value = String(field[field.index(after: equals)...])
      switch key {
      case "tap" where tapName == nil && !user && !value.isEmpty:
        tapName = value
      case "hostfwd" where user:
        guard let forward = PortForward(parsing: value) else { throw .invalidNetwork(text) }
        forwards.append(forward)
      case "mac" where mac == nil:
        do {
          mac = try MACAddress(parsing: value)
        } catch {
          throw .invalidMAC(value)
        }
      case "offloads" where !user && offloads == nil && (value == "on" || value == "off"):
        offloads = value == "on"
      case "model" where model == nil:
        guard let choice = NetworkDeviceModel(rawValue: value) else { throw .invalidNetworkModel(value) }
        model = choice
      default:
        throw .invalidNetwork(text)
      }
    }
    if user {
      self.init(attachment: .user(forwards: forwards), mac: mac, model: model ?? .virtio)
    } else {
      guard let tapName else { throw .invalidNetwork(text) }
      self.init(tapName: tapName, mac: mac, offloads: offloads ?? true, model: model ?? .virtio)
    }
  }
}

/// Where the guest's console is.
public enum ConsoleChoice: String, Sendable, CaseIterable {
  /// COM1 (ttyS0), wired as `--serial` says.
  case serial
  /// hvc0 on a virtio-console device wired to this process's standard input and output.
  case virtio

  /// Parses `serial` or `virtio`.
  public init(parsing text: String) throws(ConfigurationError) {
    guard let choice = ConsoleChoice(rawValue: text) else { throw .invalidConsole(text) }
    self = choice
  }
}

/// A user-input error in the machine configuration: one clear line.
public enum ConfigurationError: Error, Equatable, Sendable, CustomStringConvertible {
  case invalidMemorySize(String)
  /// A `--memory` item other than `merge=on|off` or `hugepages=on|off` (the whole value, the item).
  case invalidMemoryOption(String, String)
  case memoryTooSmall(UInt64)
  case memoryTooLarge(requested: UInt64, limit: UInt64)
  case invalidCPUCount(Int)
  case invalidSerial(String)
  case invalidDisk(String)
  case invalidNetwork(String)
  case invalidNetworkModel(String)
  case invalidMAC(String)
  case invalidConsole(String)
  case invalidBalloon(String, String)
  case invalidDisplay(String)
  case invalidCPUModel(String, known: [String])

  public var description: String {
    switch self {
    case .invalidMemorySize(let text):
      return "invalid memory size '\(text)': use a number with an optional K, M, G or T suffix (e.g. 512M)"
    case .invalidMemoryOption(let text, let item):
      return "invalid memory option '\(item)' in '\(text)': use SIZE[,merge=on|off][,hugepages=on|off]"
    case .memoryTooSmall(let size):
      return size == 0 ? "memory size must be greater than zero" : "memory size \(size) bytes is too small (minimum 2M)"
    case .memoryTooLarge(let requested, let limit):
      return
        "memory size \(MemorySize.format(requested)) is larger than this host can map (limit \(MemorySize.format(limit)))"
    case .invalidCPUCount(let count):
      return "invalid CPU count \(count): must be between 1 and \(MachineConfiguration.maximumCPUs)"
    case .invalidSerial(let text):
      return "invalid serial backend '\(text)': use stdio, file:PATH or none"
    case .invalidDisk(let text):
      return "invalid disk '\(text)': use PATH or PATH,readonly"
    case .invalidNetwork(let text):
      return
        "invalid network '\(text)': use tap=NAME[,mac=xx:xx:xx:xx:xx:xx][,offloads=off][,model=virtio|e1000|rtl8139] or user[,hostfwd=tcp:[HOST]:PORT-:GUESTPORT]...[,mac=...][,model=...]"
    case .invalidNetworkModel(let text):
      return "invalid network model '\(text)': use virtio, e1000 or rtl8139"
    case .invalidMAC(let text):
      return "invalid MAC address '\(text)' (expected xx:xx:xx:xx:xx:xx)"
    case .invalidConsole(let text):
      return "invalid console '\(text)': use serial or virtio"
    case .invalidBalloon(let text, let problem):
      return "invalid balloon '\(text)': \(problem)"
    case .invalidDisplay(let text):
      return
        "invalid display '\(text)': use none or vnc=[HOST:]PORT[,tablet=off] (HOST an IPv4 address, default 127.0.0.1)"
    case .invalidCPUModel(let text, let known):
      return "unknown CPU model '\(text)': use \(known.joined(separator: ", "))"
    }
  }
}

/// Parsing and formatting of sizes like `512M`.
public enum MemorySize {
  /// Parses a byte count with an optional binary suffix (K, M, G, T; case-insensitive, optional trailing B/iB).
  public static func parse(_ text: String) throws(ConfigurationError) -> UInt64 {
    var digits = Substring(text.trimmingCharacters(in: " "))
    for suffix in ["iB", "ib", "B", "b"] where digits.hasSuffix(suffix) && digits.count > suffix.count {
      digits = digits.dropLast(suffix.count)
      break
    }
    var shift: UInt64 = 0
    if let last = digits.last, let unit = "KMGT".firstIndex(of: Character(last.uppercased())) {
      shift = 10 * UInt64("KMGT".distance(from: "KMGT".startIndex, to: unit) + 1)
      digits = digits.dropLast()
    } else if digits.allSatisfy(\.isNumber) {
      shift = 20  // a bare number means MiB, as in QEMU
    }
    guard !digits.isEmpty, digits.allSatisfy(\.isNumber), let value = UInt64(digits) else {
      throw .invalidMemorySize(text)
    }
    guard value <= (UInt64.max >> shift) else { throw .invalidMemorySize(text) }
    return value << shift
  }

  /// Parses the CLI's `--memory` value: a size, then optional comma-separated `merge=on|off`
  /// (KSM) and `hugepages=on|off` (transparent huge pages), e.g. `2G,merge=on,hugepages=on`.
  public static func parseWithAdvice(_ text: String) throws(ConfigurationError) -> (
    size: UInt64, advice: GuestMemoryAdvice
  ) {
    let items = text.split(separator: ",", omittingEmptySubsequences: false)
    let size = try parse(String(items[0]))
    var advice = GuestMemoryAdvice()
    for item in items.dropFirst() {
      let pair = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
      let value: Bool
      switch pair.count == 2 ? pair[1] : "" {
      case "on": value = true
      case "off": value = false
      default: throw .invalidMemoryOption(text, String(item))
      }
      switch pair[0] {
      case "merge": advice.mergeable = value
      case "hugepages": advice.hugePages = value
      default: throw .invalidMemoryOption(text, String(item))
      }
    }
    return (size, advice)
  }

  /// Formats a byte count with the largest exact binary unit.
  public static func format(_ bytes: UInt64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")]
    where bytes >= (1 << shift) && bytes % (1 << shift) == 0 {
      return "\(bytes >> UInt64(shift))\(unit)"
    }
    return bytes >= 1 << 20 ? "\(bytes >> 20)M" : "\(bytes)"
  }
}

extension String {
  fileprivate func trimmingCharacters(in set: Character) -> String {
    var result = Substring(self)
    while result.first == set { result = result.dropFirst() }
    while result.last == set { result = result.dropLast() }
    return String(result)
  }
}

/// Everything needed to build and boot one virtual machine. The CLI and the API both fill this in.
/// How the software CPU runs guest code (the SoftCPU module's `SoftCPUTier`).
public typealias SoftCPUExecutionTier = SoftCPUTier

public struct MachineConfiguration: Sendable {
  /// The most vCPUs a machine may have.
  public static let maximumCPUs = 64
  /// The smallest RAM we accept.
  public static let minimumMemory: UInt64 = 2 << 20

  public var kernelPath: String
  public var initrdPath: String?
  public var commandLine: String
  public var memorySize: UInt64
  /// What the host kernel is told about guest RAM: KSM merging, transparent huge pages.
  public var memoryAdvice = GuestMemoryAdvice()
  public var cpuCount: Int
  public var accelerator: AcceleratorChoice
  public var serial: SerialChoice
  /// Path of the KVM device (overridable for tests and unusual hosts).
  public var kvmDevicePath: String
  /// Print what was chosen (accelerator, memory layout) to standard error.
  public var verbose: Bool
  /// virtio-blk disks, attached in order from PCI slot 1.
  public var disks: [DiskConfiguration] = []
  /// virtio-net interfaces, attached after the disks.
  public var networks: [NetworkConfiguration] = []
  /// The guest console: COM1 (default) or a virtio-console (hvc0) on standard input/output.
  public var console: ConsoleChoice = .serial
  /// The CPU model the vCPUs present; nil: `host` on KVM, `hostvisor` on the software CPU.
  public var cpuModel: GuestCPUModel?
  /// How the software CPU runs guest code (interpreter, translator, lockstep check).
  public var softCPUTier: SoftCPUTier = .standard
  /// Executions of a block before the software CPU translates it.
  public var softCPUThreshold: UInt32 = SoftCPUTier.defaultThreshold
  /// A virtio-balloon device, attached last.
  public var balloon: BalloonConfiguration?
  /// The framebuffer and its VNC server; none by default (no device at all).
  public var display: DisplayChoice = .none
  /// Build the TAP-backed interfaces without opening their TAPs (a live migration's
  /// destination, whose source still holds them): `VirtualMachine.attachNetworkInterfaces`
  /// opens them once the source let go.
  public var openTapsLater = false

  public init(
    kernelPath: String, initrdPath: String? = nil, commandLine: String = "console=ttyS0",
    memorySize: UInt64 = 512 << 20, cpuCount: Int = 1, accelerator: AcceleratorChoice = .auto,
    serial: SerialChoice = .stdio, kvmDevicePath: String = "/dev/kvm", verbose: Bool = false
  ) {
    self.kernelPath = kernelPath
    self.initrdPath = initrdPath
    self.commandLine = commandLine
    self.memorySize = memorySize
    self.cpuCount = cpuCount
    self.accelerator = accelerator
    self.serial = serial
    self.kvmDevicePath = kvmDevicePath
    self.verbose = verbose
  }

  /// Checks sizes and counts before anything is allocated.
  public func validate() throws(ConfigurationError) {
    guard memorySize >= Self.minimumMemory else { throw .memoryTooSmall(memorySize) }
    let limit = Self.hostMemoryLimit()
    guard memorySize <= limit else { throw .memoryTooLarge(requested: memorySize, limit: limit) }
    guard (1...Self.maximumCPUs).contains(cpuCount) else { throw .invalidCPUCount(cpuCount) }
  }

  /// The largest guest RAM this host can back: its physical RAM (guest RAM is ordinary
  /// process memory, so more could only fail later, inside the guest), capped by
  /// Hostvisor's 1 TiB guest-physical limit.
  public static func hostMemoryLimit() -> UInt64 {
    let pages = sysconf(Int32(_SC_PHYS_PAGES))
    let pageSize = sysconf(Int32(_SC_PAGESIZE))
    guard pages > 0, pageSize > 0 else { return GuestMemory.maximumSize }
    return min(UInt64(pages) * UInt64(pageSize), GuestMemory.maximumSize)
  }
}
