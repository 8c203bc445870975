import FuzzSupport
import Glibc
import VMCore
import Virtio

@testable import VMM

/// The machine-state file reader: the header and checksum (`MachineStateFile.decode`) and the
/// sections a restore reads (machine description, software CPU and its interrupt controllers,
/// legacy devices, ACPI PM, PCI, every virtio device), restored into a real machine: a
/// software-CPU machine with a disk, a virtio console and a balloon, built fresh for each input.
///
/// Input: a mode byte, then either a whole state file (even mode: header, checksum and payload
/// all from the fuzzer) or a payload that gets a valid header and checksum (odd mode), so the
/// fuzzer reaches the section parsers without having to solve CRC-32C.
@main
enum FuzzState {
  nonisolated(unsafe) static var configuration: MachineConfiguration?

  static func main() {
    FuzzDriver.run(name: "state", seeds: seeds) { input in runOne(&input) }
  }

  /// The machine every input is restored into: a tiny ELF kernel and a 64 KiB disk, both in
  /// memfds, 16 MiB of RAM on the software CPU.
  static func machineConfiguration() -> MachineConfiguration {
    if let configuration { return configuration }
    let elf = FuzzImages.haltingELFKernel
    var configuration = MachineConfiguration(
      kernelPath: FuzzDriver.memoryFile(name: "fuzz-kernel", bytes: elf, size: elf.count), memorySize: 16 << 20,
      accelerator: .soft,
      serial: .none)
    configuration.disks = [DiskConfiguration(path: FuzzDriver.memoryFile(name: "fuzz-disk", size: 64 << 10))]
    configuration.console = .virtio
    configuration.balloon = BalloonConfiguration(
      targetMiB: 1, options: BalloonOptions(deflateOnOOM: true, statisticsInterval: 5, freePageReporting: true))
    Self.configuration = configuration
    return configuration
  }

  static func runOne(_ input: inout FuzzInput) {
    let mode = input.byte()
    let payload: [UInt8]
    if mode & 1 == 0 {
      do {
        payload = try MachineStateFile.decode(input.rest())
      } catch {
        _ = error.description
        FuzzDriver.count("files refused by the header")
        return
      }
    } else {
      payload = try! MachineStateFile.decode(MachineStateFile.encode(payload: input.rest()))
    }
    let machine = try! VirtualMachine(configuration: machineConfiguration())
    defer { machine.shutdownDevices() }
    do {
      var reader = StateReader(bytes: payload)
      _ = try VirtualMachine.recordedHostTime(in: payload)
      let description = try reader.section("machine") { (reader) throws(MachineStateError) in
        try MachineDescription.restore(from: &reader)
      }
      try machine.restoreSections(from: &reader, description: description, paused: false)
      FuzzDriver.count("states restored")
    } catch {
      _ = "\(error)"
      FuzzDriver.count("states refused")
    }
  }

  /// The state of the fuzz machine as a snapshot writes it: as a payload and as a whole file.
  static func seeds() -> [[UInt8]] {
    let machine = try! VirtualMachine(configuration: machineConfiguration())
    defer { machine.shutdownDevices() }
    let payload = try! machine.encodeState(memoryPath: "/dev/null", networkIDs: nil)
    return [[1] + payload, [0] + MachineStateFile.encode(payload: payload)]
  }
}
