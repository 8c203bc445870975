import Devices
import Testing
import VMCore

@Suite("Hostile guest fuzzing")
struct FuzzTests {
  private static let interestingPorts: [UInt16] = [
    0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF, 0x60, 0x64, 0x61, 0x70, 0x71, 0x80, 0x92, 0xF4, 0x3F7,
    0x400, 0x5F, 0x65, 0x72,
  ]

  @Test(arguments: [UInt64(1), 2, 3, 4])
  func randomPortTrafficNeverCrashes(seed: UInt64) async throws {
    let machine = try LegacyMachine()
    // Several vCPU-like threads and a host input thread at once.
    await withTaskGroup(of: Void.self) { group in
      for worker in 0..<3 {
        group.addTask {
          var random = SeededGenerator(seed: seed &* 1000 &+ UInt64(worker))
          for _ in 0..<20_000 {
            let port =
              Bool.random(using: &random)
              ? Self.interestingPorts.randomElement(using: &random)!
              : UInt16.random(in: 0...0x400, using: &random)
            let size = [1, 2, 4].randomElement(using: &random)!
            let value = UInt32.random(in: 0...UInt32.max, using: &random)
            if Bool.random(using: &random) {
              machine.bus.portWrite(port, size: size, value: value)
            } else {
              let result = machine.bus.portRead(port, size: size)
              #expect(size == 4 || result >> (size * 8) == 0, "reads stay within their size")
            }
          }
        }
      }
      group.addTask {
        var random = SeededGenerator(seed: seed ^ 0xFEED)
        for _ in 0..<2_000 {
          let count = Int.random(in: 0...64, using: &random)
          machine.devices.serialPort.receive((0..<count).map { _ in UInt8.random(in: 0...255, using: &random) })
        }
      }
    }
    // The UART still works after the storm.
    machine.outb(0x3FB, 0x03)
    machine.outb(0x3FC, 0x00)
    let before = machine.serialOutput.bytes.count
    machine.outb(0x3F8, 0x21)
    #expect(machine.serialOutput.bytes.count == before + 1)
  }

  @Test func oddAccessSizesGoingStraightToDevices() throws {
    let machine = try LegacyMachine()
    let devices: [(any PortIODevice, [UInt16])] = [
      (machine.devices.serialPort, Array(0x3F8...0x3FF)),
      (machine.devices.keyboardController, [0x60, 0x64]),
      (machine.devices.cmos, [0x70, 0x71]),
      (machine.devices.debugExit, [0xF4]),
      (machine.devices.systemControlA, [0x92]),
      (try #require(machine.devices.systemControlB), [0x61]),
      (machine.devices.postCode, [0x80]),
    ]
    var random = SeededGenerator(seed: 42)
    for _ in 0..<50_000 {
      let (device, ports) = devices.randomElement(using: &random)!
      // Including ports the device does not own and sizes no CPU produces.
      let port =
        Bool.random(using: &random)
        ? ports.randomElement(using: &random)! : UInt16.random(in: 0...0xFFFF, using: &random)
      let size = [Int.min, -1, 0, 1, 2, 3, 4, 8, 16, Int.max].randomElement(using: &random)!
      if Bool.random(using: &random) {
        device.portWrite(port: port, size: size, value: UInt32.random(in: 0...UInt32.max, using: &random))
      } else {
        _ = device.portRead(port: port, size: size)
      }
    }
    machine.outb(0x70, 0x0D)
    #expect(machine.inb(0x71) == 0x80, "the clock still answers")
    #expect(machine.inb(0x3FD) & 0x60 == 0x60, "the UART still answers")
  }
}
