/// A 93C46-style serial EEPROM (64 16-bit words) on the Microwire interface, read-only: with
/// chip select high, each rising clock edge shifts in a bit of the command (leading zeros, the
/// start bit, the opcode and six address bits) or, during a READ, shifts out the next data bit
/// (a dummy zero after the address, then the words from that address on, most significant bit
/// first). Dropping chip select ends the command.
struct MicrowireEEPROM {
  /// The contents (the E1000 also reads them through EERD).
  let words: [UInt16]
  private var clockHigh = false
  private var started = false
  private var command: UInt32 = 0
  private var commandBits = 0
  private var reading = false
  private var address = 0
  private var bitIndex = 0
  /// The level of the data output pin.
  private(set) var dataOut = false

  init(words: [UInt16]) { self.words = words }

  /// Sets the chip select, clock and data input pins.
  mutating func drive(chipSelect: Bool, clock: Bool, dataIn: Bool) {
    let rising = clock && !clockHigh
    clockHigh = clock
    guard chipSelect else {
      started = false
      command = 0
      commandBits = 0
      reading = false
      dataOut = false
      return
    }
    guard rising else { return }
    if reading {
      dataOut = (words[address] >> (15 - bitIndex)) & 1 != 0
      bitIndex += 1
      if bitIndex == 16 {
        bitIndex = 0
        address = (address + 1) % words.count
      }
      return
    }
    guard started else {
      started = dataIn
      return
    }
    command = command << 1 | (dataIn ? 1 : 0)
    commandBits += 1
    guard commandBits == 8 else { return }
    if command >> 6 == 0b10 {
      reading = true
      address = Int(command & 0x3F) % words.count
      bitIndex = 0
      dataOut = false
    } else {
      // Write, erase and enable commands: the contents are fixed.
      started = false
      command = 0
      commandBits = 0
    }
  }
}
