import Devices
import Testing
import VMCore

/// Host keystrokes on the i8042 keyboard, read back through the ports as a guest driver reads
/// them. Expected bytes are the IBM PC scan code tables (set 1 and set 2).
@Suite("PS/2 keyboard input")
struct PS2KeyboardTests {
  private let dataPort: UInt16 = 0x60
  private let commandPort: UInt16 = 0x64

  /// Drains the output buffer as an interrupt handler would, one byte per IRQ 1 edge.
  private func drain(_ machine: LegacyMachine) -> [UInt8] {
    var bytes: [UInt8] = []
    while machine.inb(commandPort) & 0x01 != 0 && bytes.count < 10_000 {
      bytes.append(machine.inb(dataPort))
    }
    return bytes
  }

  private func writeCommandByte(_ machine: LegacyMachine, _ value: UInt8) {
    machine.outb(commandPort, 0x60)
    machine.outb(dataPort, value)
  }

  @Test func upperCaseLetterIsShiftedAndTranslatedToSetOne() throws {
    let machine = try LegacyMachine()
    let keyboard = PS2KeyboardInput(controller: machine.devices.keyboardController)
    keyboard.keysymEvent(0x41, down: true)  // 'A'
    keyboard.keysymEvent(0x41, down: false)
    // Left Shift make, A make, A break, Left Shift break (set 1).
    #expect(drain(machine) == [0x2A, 0x1E, 0x9E, 0xAA])
    #expect(machine.sink.risingEdges(1) == 4, "one IRQ 1 edge per byte")
  }

  @Test func untranslatedControllerPassesSetTwo() throws {
    let machine = try LegacyMachine()
    writeCommandByte(machine, 0x25)  // translation off
    let keyboard = PS2KeyboardInput(controller: machine.devices.keyboardController)
    keyboard.type(">")
    #expect(drain(machine) == [0x12, 0x49, 0xF0, 0x49, 0xF0, 0x12])
    keyboard.keysymEvent(0xFF52, down: true)  // Up: an extended key
    keyboard.keysymEvent(0xFF52, down: false)
    #expect(drain(machine) == [0xE0, 0x75, 0xE0, 0xF0, 0x75])
  }

  @Test func scanCodeSetOneSelectedByTheGuest() throws {
    let machine = try LegacyMachine()
    writeCommandByte(machine, 0x25)
    machine.outb(dataPort, 0xF0)
    machine.outb(dataPort, 0x01)
    #expect(drain(machine) == [0xFA, 0xFA])
    machine.outb(dataPort, 0xF0)
    machine.outb(dataPort, 0x00)
    #expect(drain(machine) == [0xFA, 0xFA, 0x01], "get scan code set: two ACKs, then 1")
    let keyboard = PS2KeyboardInput(controller: machine.devices.keyboardController)
    keyboard.pressChord([0xFFE3, 0xFFE9, 0xFFFF])  // Ctrl-Alt-Del
    #expect(drain(machine) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
  }

  @Test func typedTextWaitsInTheKeyboardWhileTheGuestIsSlow() throws {
    let machine = try LegacyMachine()
    let keyboard = PS2KeyboardInput(controller: machine.devices.keyboardController)
    let text = "echo KBD_OK > /dev/ttyS0\n"
    #expect(keyboard.type(text))
    let bytes = drain(machine)
    // Every key is a make and a break; capitals and '>' and '_' add a Shift make and break.
    let shifted = text.filter { $0.isUppercase || $0 == ">" || $0 == "_" }.count
    #expect(bytes.count == 2 * text.count + 2 * shifted)
    #expect(Array(bytes.suffix(2)) == [0x1C, 0x9C], "Return make and break")
    #expect(Array(bytes.prefix(2)) == [0x12, 0x92], "'e' make and break")
  }

  @Test func keyboardIdentifiesAndKeysStopWhileDisabled() throws {
    let machine = try LegacyMachine()
    machine.outb(dataPort, 0xF2)
    #expect(drain(machine) == [0xFA, 0xAB, 0x83])
    machine.outb(dataPort, 0xF5)  // disable scanning
    #expect(drain(machine) == [0xFA])
    let keyboard = PS2KeyboardInput(controller: machine.devices.keyboardController)
    keyboard.type("a")
    #expect(drain(machine).isEmpty)
    machine.outb(dataPort, 0xF4)
    #expect(drain(machine) == [0xFA])
    keyboard.type("a")
    #expect(drain(machine) == [0x1E, 0x9E])
  }

  @Test func keyNamesForSendKey() {
    #expect(PS2ScanCodes.keysym(named: "ctrl") == 0xFFE3)
    #expect(PS2ScanCodes.keysym(named: "F12") == 0xFFC9)
    #expect(PS2ScanCodes.keysym(named: "x") == 0x78)
    #expect(PS2ScanCodes.keysym(named: "nosuchkey") == nil)
  }
}
