import Devices
import Testing
import VMCore

private let dataPort: UInt16 = 0x60
private let commandPort: UInt16 = 0x64
private let irq1: UInt32 = 1
private let irq12: UInt32 = 12

@Suite("i8042 keyboard controller")
struct I8042Tests {
  /// Sends a controller command and returns the reply byte, checking OBF as a driver does.
  private func command(_ machine: LegacyMachine, _ byte: UInt8) -> UInt8? {
    machine.outb(commandPort, byte)
    guard machine.inb(commandPort) & 0x01 != 0 else { return nil }
    return machine.inb(dataPort)
  }

  @Test func selfTestAndInterfaceTestPass() throws {
    let machine = try LegacyMachine()
    #expect(machine.inb(commandPort) & 0x03 == 0, "nothing to read, ready for input")
    #expect(command(machine, 0xAA) == 0x55)
    #expect(machine.inb(commandPort) & 0x01 == 0, "reading the data port empties the buffer")
    #expect(machine.inb(commandPort) & 0x04 != 0, "system flag set after self-test")
    #expect(command(machine, 0xAB) == 0x00)
    #expect(command(machine, 0xA9) == 0x00)
  }

  @Test func commandByteReadWriteAndPortEnables() throws {
    let machine = try LegacyMachine()
    #expect(command(machine, 0x20) == 0x65)
    machine.outb(commandPort, 0x60)
    #expect(machine.inb(commandPort) & 0x08 != 0, "last write was a command")
    machine.outb(dataPort, 0x47)
    #expect(machine.inb(commandPort) & 0x08 == 0)
    #expect(command(machine, 0x20) == 0x47)
    #expect(command(machine, 0xAD) == nil)
    #expect(machine.devices.keyboardController.commandByte & 0x10 != 0, "keyboard disabled")
    _ = command(machine, 0xAE)
    #expect(machine.devices.keyboardController.commandByte & 0x10 == 0)
    _ = command(machine, 0xA7)
    #expect(machine.devices.keyboardController.commandByte & 0x20 != 0, "aux disabled")
    _ = command(machine, 0xA8)
    #expect(machine.devices.keyboardController.commandByte & 0x20 == 0)
  }

  @Test func outputPortReadWriteAndResetThroughIt() throws {
    let machine = try LegacyMachine()
    #expect(command(machine, 0xD0) == 0x03)
    machine.outb(commandPort, 0xD1)
    machine.outb(dataPort, 0x03)
    #expect(machine.control.stopReason == nil)
    #expect(machine.devices.keyboardController.outputPort == 0x03)
    machine.outb(commandPort, 0xD1)
    machine.outb(dataPort, 0x02)
    #expect(machine.control.stopReason == .reset(reason: "i8042 reset"))
  }

  @Test func pulsingTheResetLineRequestsAReset() throws {
    let machine = try LegacyMachine()
    machine.outb(commandPort, 0xFF)  // pulses nothing
    #expect(machine.control.stopReason == nil)
    machine.outb(commandPort, 0xFE)
    #expect(machine.control.stopReason == .reset(reason: "i8042 reset"))
    #expect(machine.control.stopReason?.exitStatus == 0)
  }

  @Test func keyboardRepliesRaiseIRQ1ForEveryByte() throws {
    let machine = try LegacyMachine()
    machine.outb(dataPort, 0xFF)  // keyboard reset
    #expect(machine.sink.level(irq1))
    #expect(machine.inb(commandPort) & 0x21 == 0x01, "keyboard data, not aux")
    machine.sink.clearHistory()
    #expect(machine.inb(dataPort) == 0xFA)
    #expect(machine.sink.history(irq1) == [false, true], "a fresh edge for the second byte")
    #expect(machine.inb(dataPort) == 0xAA)
    #expect(!machine.sink.level(irq1))

    machine.outb(dataPort, 0xF2)  // identify
    var reply: [UInt8] = []
    while machine.inb(commandPort) & 0x01 != 0 { reply.append(machine.inb(dataPort)) }
    #expect(reply == [0xFA, 0xAB, 0x83])

    machine.outb(dataPort, 0xED)  // LEDs, then the parameter
    machine.outb(dataPort, 0x07)
    #expect(machine.inb(dataPort) == 0xFA)
    #expect(machine.inb(dataPort) == 0xFA)
    machine.outb(dataPort, 0xEE)
    #expect(machine.inb(dataPort) == 0xEE)
  }

  @Test func keyboardInterruptFollowsTheCommandByte() throws {
    let machine = try LegacyMachine()
    machine.outb(commandPort, 0x60)
    machine.outb(dataPort, 0x44)  // interrupts off
    machine.outb(dataPort, 0xF4)
    #expect(machine.inb(commandPort) & 0x01 != 0)
    #expect(!machine.sink.level(irq1))
    #expect(machine.inb(dataPort) == 0xFA)
  }

  @Test func auxiliaryLoopAndAbsentMouse() throws {
    let machine = try LegacyMachine()
    machine.outb(commandPort, 0x60)
    machine.outb(dataPort, 0x47)  // both interrupts on
    machine.outb(commandPort, 0xD3)
    machine.outb(dataPort, 0x5A)
    #expect(machine.inb(commandPort) & 0x21 == 0x21, "aux data waiting")
    #expect(machine.sink.level(irq12))
    #expect(!machine.sink.level(irq1))
    #expect(machine.inb(dataPort) == 0x5A)
    #expect(!machine.sink.level(irq12))

    machine.outb(commandPort, 0xD4)
    machine.outb(dataPort, 0xFF)  // reset the mouse: nobody answers
    #expect(machine.inb(commandPort) & 0x61 == 0x61, "aux data with the timeout bit")
    #expect(machine.inb(dataPort) == 0xFE)
    #expect(machine.inb(commandPort) & 0x61 == 0)
  }

  @Test func unknownCommandsAndFloodsAreHarmless() throws {
    let machine = try LegacyMachine()
    for _ in 0..<100 { machine.outb(commandPort, 0x20) }
    var count = 0
    while machine.inb(commandPort) & 0x01 != 0 && count < 1000 {
      _ = machine.inb(dataPort)
      count += 1
    }
    #expect(count > 0 && count <= 16, "the output queue is bounded")
    machine.outb(commandPort, 0xC8)
    #expect(machine.inb(commandPort) & 0x01 == 0)
    #expect(machine.control.stopReason == nil)
  }
}
