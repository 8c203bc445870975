import Devices
import Glibc
import Testing
import VMCore

@Suite("CMOS RTC")
struct CMOSTests {
  private func read(_ machine: LegacyMachine, _ register: UInt8) -> UInt8 {
    machine.outb(0x70, register)
    return machine.inb(0x71)
  }

  private func write(_ machine: LegacyMachine, _ register: UInt8, _ value: UInt8) {
    machine.outb(0x70, register)
    machine.outb(0x71, value)
  }

  private func fromBCD(_ value: UInt8) -> Int32 { Int32(value >> 4) * 10 + Int32(value & 0x0F) }

  /// Reads the clock as Linux does and converts it to seconds since the epoch (UTC).
  private func guestTime(_ machine: LegacyMachine) -> (seconds: Int, weekday: Int32) {
    let binary = read(machine, 0x0B) & 0x04 != 0
    let decode: (UInt8) -> Int32 = { binary ? Int32($0) : fromBCD($0) }
    var fields = tm()
    fields.tm_sec = decode(read(machine, 0x00))
    fields.tm_min = decode(read(machine, 0x02))
    fields.tm_hour = decode(read(machine, 0x04))
    fields.tm_mday = decode(read(machine, 0x07))
    fields.tm_mon = decode(read(machine, 0x08)) - 1
    fields.tm_year = decode(read(machine, 0x32)) * 100 + decode(read(machine, 0x09)) - 1900
    let weekday = decode(read(machine, 0x06))
    return (Int(timegm(&fields)), weekday)
  }

  private func hostWeekday(_ seconds: Int) -> Int32 {
    var time = time_t(seconds)
    var fields = tm()
    gmtime_r(&time, &fields)
    return fields.tm_wday + 1
  }

  @Test func statusRegistersAfterReset() throws {
    let machine = try LegacyMachine()
    #expect(read(machine, 0x0A) == 0x26)
    #expect(read(machine, 0x0B) == 0x02)
    #expect(read(machine, 0x0C) == 0x00)
    #expect(read(machine, 0x0D) == 0x80)
    #expect(machine.inb(0x70) == 0xFF, "the index port is write-only")
  }

  @Test func timeMatchesTheHostInBCD() throws {
    let machine = try LegacyMachine()
    let (seconds, weekday) = guestTime(machine)
    let host = Int(time(nil))
    #expect(abs(seconds - host) <= 3)
    #expect(weekday == hostWeekday(seconds))
    #expect(read(machine, 0x32) == 0x20, "century in BCD")
    for register: UInt8 in [0, 2, 4, 7, 8, 9] {
      let value = read(machine, register)
      #expect(value & 0x0F <= 9 && value >> 4 <= 9, "register \(register) is valid BCD")
    }
  }

  @Test func timeMatchesTheHostInBinary() throws {
    let machine = try LegacyMachine()
    write(machine, 0x0B, 0x06)
    #expect(read(machine, 0x0B) == 0x06)
    let (seconds, weekday) = guestTime(machine)
    #expect(abs(seconds - Int(time(nil))) <= 3)
    #expect(weekday == hostWeekday(seconds))
    #expect(read(machine, 0x32) == 20, "century in binary")
  }

  @Test func twelveHourModeMarksAfternoon() throws {
    let machine = try LegacyMachine()
    write(machine, 0x0B, 0x04)  // binary, 12-hour
    var now = time(nil)
    var fields = tm()
    gmtime_r(&now, &fields)
    let hour = read(machine, 0x04)
    let expected = UInt8(fields.tm_hour % 12 == 0 ? 12 : fields.tm_hour % 12) | (fields.tm_hour >= 12 ? 0x80 : 0)
    // Tolerate the hour turning over between the two reads.
    var later = now + 5
    var laterFields = tm()
    gmtime_r(&later, &laterFields)
    let expectedLater =
      UInt8(laterFields.tm_hour % 12 == 0 ? 12 : laterFields.tm_hour % 12) | (laterFields.tm_hour >= 12 ? 0x80 : 0)
    #expect(hour == expected || hour == expectedLater)
  }

  @Test func guestCanSetTheClock() throws {
    let machine = try LegacyMachine()
    write(machine, 0x0B, 0x82)  // SET while updating
    write(machine, 0x09, 0x31)  // 2031
    write(machine, 0x08, 0x12)  // December
    write(machine, 0x07, 0x25)  // 25th
    write(machine, 0x04, 0x18)
    write(machine, 0x02, 0x30)
    write(machine, 0x00, 0x00)
    write(machine, 0x0B, 0x02)
    #expect(read(machine, 0x09) == 0x31)
    #expect(read(machine, 0x08) == 0x12)
    #expect(read(machine, 0x07) == 0x25)
    #expect(read(machine, 0x04) == 0x18)
    #expect(read(machine, 0x02) == 0x30)
    #expect(read(machine, 0x06) == 0x05, "2031-12-25 is a Thursday")
    let expected = 1_955_989_800  // 2031-12-25 18:30:00 UTC
    #expect(abs(guestTime(machine).seconds - expected) <= 3)
    #expect(abs(machine.devices.cmos.guestClockOffset - Int64(expected - Int(time(nil)))) <= 3)

    // Nonsense values are clamped, never trusted.
    write(machine, 0x08, 0xFF)
    write(machine, 0x04, 0xFF)
    #expect(read(machine, 0x08) == 0x12)
    #expect(read(machine, 0x04) == 0x23)
  }

  @Test func nmiBitAndNVRAM() throws {
    let machine = try LegacyMachine()
    machine.outb(0x70, 0x80 | 0x0A)
    #expect(machine.devices.cmos.nmiDisabled)
    #expect(machine.inb(0x71) == 0x26, "the NMI bit is not part of the index")
    machine.outb(0x70, 0x0A)
    #expect(!machine.devices.cmos.nmiDisabled)
    for register in UInt8(0x40)...0x7F {
      write(machine, register, register ^ 0x5A)
    }
    for register in UInt8(0x40)...0x7F {
      #expect(read(machine, register) == register ^ 0x5A)
    }
    write(machine, 0x0D, 0x00)
    #expect(read(machine, 0x0D) == 0x80, "register D is read-only")
  }

  @Test func memorySizeRegistersFor512MiB() throws {
    let machine = try LegacyMachine(memorySize: 512 << 20)
    let word: (UInt8) -> Int = { Int(self.read(machine, $0)) | Int(self.read(machine, $0 + 1)) << 8 }
    #expect(word(0x15) == 640)
    #expect(word(0x17) == 0xFFFF)
    #expect(word(0x30) == 0xFFFF)
    #expect(word(0x34) == (512 - 16) * 16)
    #expect(read(machine, 0x5B) == 0 && read(machine, 0x5C) == 0 && read(machine, 0x5D) == 0)
  }

  @Test func memorySizeRegistersAroundThePCIHole() throws {
    let machine = try LegacyMachine(memorySize: 6 << 30)
    let word: (UInt8) -> Int = { Int(self.read(machine, $0)) | Int(self.read(machine, $0 + 1)) << 8 }
    #expect(word(0x34) == (3072 - 16) * 16, "RAM below the 3 GiB hole")
    let above4G = Int(read(machine, 0x5B)) | Int(read(machine, 0x5C)) << 8 | Int(read(machine, 0x5D)) << 16
    #expect(above4G == 3 * 1024 * 16, "3 GiB above 4 GiB in 64 KiB units")

    let small = try LegacyMachine(memorySize: 8 << 20)
    #expect(read(small, 0x17) == 0x00 && read(small, 0x18) == 0x1C, "7168 KiB above 1 MiB")
    #expect(read(small, 0x34) == 0 && read(small, 0x35) == 0)
  }
}
