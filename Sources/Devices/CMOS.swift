import Glibc
import Synchronization
import VMCore

/// The MC146818-compatible CMOS real-time clock and NVRAM at ports 0x70 (index) and 0x71 (data).
///
/// - Port 0x70 (write): bits 0-6 select one of 128 registers, bit 7 disables NMIs (stored,
///   see `nmiDisabled`). Reads of 0x70 return all ones (the index is write-only).
/// - Registers 0-9: seconds, alarm seconds, minutes, alarm minutes, hours, alarm hours, day of
///   week (Sunday = 1), day of month, month, year; 0x32 is the century. The time is the host's
///   UTC time plus an offset the guest changes by writing time registers. Values are BCD unless
///   register B bit 2 is set (binary); hours are 24-hour when register B bit 1 is set (the
///   default, B = 0x02), otherwise 1-12 with bit 7 meaning PM.
/// - Register A: update-in-progress always clear, divider 0x26 (32.768 kHz, 1024 Hz rate).
///   Register C reads as 0 (no interrupt flags); register D reads 0x80 (valid RAM and time).
/// - The memory size bytes a PC BIOS fills in: 0x15-0x16 base memory (640 KiB), 0x17-0x18 and
///   0x30-0x31 extended memory above 1 MiB in KiB (at most 0xFFFF), 0x34-0x35 memory above
///   16 MiB below the PCI hole in 64 KiB units, 0x5B-0x5D memory above 4 GiB in 64 KiB units.
///   The standard checksum over 0x10-0x2D is at 0x2E-0x2F.
/// - Everything else is plain NVRAM.
///
/// Not modelled: the periodic, alarm and update-ended interrupts (IRQ 8 is never raised and
/// register C never reports a flag), and the update cycle itself.
public final class CMOSClock: PortIODevice {
  /// The index port.
  public static let indexPort: UInt16 = 0x70
  /// The data port.
  public static let dataPort: UInt16 = 0x71

  private let now: @Sendable () -> Int64
  private let state: Mutex<CMOSState>

  /// Creates the clock for a machine with `memorySize` bytes of RAM, laid out as `GuestMemory`
  /// does (RAM above `GuestMemory.pciHoleStart` moves above 4 GiB). `now` supplies the host
  /// time in seconds since the Unix epoch (UTC).
  public init(memorySize: UInt64, now: @escaping @Sendable () -> Int64 = { Int64(time(nil)) }) {
    self.now = now
    self.state = Mutex(CMOSState(memorySize: memorySize))
  }

  public func portRead(port: UInt16, size: Int) -> UInt32 {
    let hostTime = now()
    return state.withLock { cmos in
      PortAccess.readBytes(port: port, size: size) { port in
        switch port {
        case Self.indexPort: return 0xFF
        case Self.dataPort: return cmos.read(hostTime: hostTime)
        default: return nil
        }
      }
    }
  }

  public func portWrite(port: UInt16, size: Int, value: UInt32) {
    let hostTime = now()
    state.withLock { cmos in
      PortAccess.writeBytes(port: port, size: size, value: value) { port, byte in
        switch port {
        case Self.indexPort:
          cmos.index = byte & 0x7F
          cmos.nmiDisabled = byte & 0x80 != 0
        case Self.dataPort:
          cmos.write(byte, hostTime: hostTime)
        default:
          break
        }
      }
    }
  }

  /// Whether the guest last wrote the index port with the NMI-disable bit set.
  public var nmiDisabled: Bool { state.withLock { $0.nmiDisabled } }

  /// Seconds the guest's clock runs ahead of the host's UTC clock.
  public var guestClockOffset: Int64 { state.withLock { $0.offset } }

  /// The raw NVRAM byte at `index` (0-127), without time or status register logic.
  public func storedByte(at index: UInt8) -> UInt8 { state.withLock { $0.ram[Int(index & 0x7F)] } }
}

/// A broken-down UTC time, as the clock registers show it.
struct CalendarTime: Equatable {
  var year: Int64
  var month: Int64  // 1-12
  var day: Int64  // 1-31
  var hour: Int64
  var minute: Int64
  var second: Int64
  var weekday: Int64  // 0 = Sunday

  init(year: Int64, month: Int64, day: Int64, hour: Int64, minute: Int64, second: Int64) {
    self.year = year
    self.month = month
    self.day = day
    self.hour = hour
    self.minute = minute
    self.second = second
    self.weekday = 0
    self.weekday = Self.floorModulo(Self.daysSinceEpoch(year: year, month: month, day: day) + 4, 7)
  }

  /// Breaks down `seconds` since 1970-01-01 00:00:00 UTC (proleptic Gregorian calendar).
  init(secondsSinceEpoch seconds: Int64) {
    let days = Self.floorDivide(seconds, 86400)
    let secondOfDay = seconds - days * 86400
    // Count from 0000-03-01 so leap days fall at the end of each year.
    let shifted = days + 719_468
    let era = Self.floorDivide(shifted, 146_097)
    let dayOfEra = shifted - era * 146_097
    let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
    let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
    let marchMonth = (5 * dayOfYear + 2) / 153
    let day = dayOfYear - (153 * marchMonth + 2) / 5 + 1
    let month = marchMonth < 10 ? marchMonth + 3 : marchMonth - 9
    let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
    self.init(
      year: year, month: month, day: day, hour: secondOfDay / 3600, minute: secondOfDay % 3600 / 60,
      second: secondOfDay % 60)
  }

  /// Seconds since the epoch; fields out of their usual range carry over arithmetically.
  var secondsSinceEpoch: Int64 {
    Self.daysSinceEpoch(year: year, month: month, day: day) * 86400 + hour * 3600 + minute * 60 + second
  }

  /// Days from 1970-01-01 to the given date (month 1-12; other fields may be out of range).
  static func daysSinceEpoch(year: Int64, month: Int64, day: Int64) -> Int64 {
    let marchYear = month <= 2 ? year - 1 : year
    let era = floorDivide(marchYear, 400)
    let yearOfEra = marchYear - era * 400
    let marchMonth = month > 2 ? month - 3 : month + 9
    let dayOfYear = (153 * marchMonth + 2) / 5 + day - 1
    let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
    return era * 146_097 + dayOfEra - 719_468
  }

  static func floorDivide(_ value: Int64, _ divisor: Int64) -> Int64 {
    let quotient = value / divisor
    return (value % divisor != 0 && (value < 0) != (divisor < 0)) ? quotient - 1 : quotient
  }

  static func floorModulo(_ value: Int64, _ divisor: Int64) -> Int64 {
    value - floorDivide(value, divisor) * divisor
  }
}

/// Registers and NVRAM; always used with the clock's lock held.
struct CMOSState {
  static let seconds: UInt8 = 0x00
  static let minutes: UInt8 = 0x02
  static let hours: UInt8 = 0x04
  static let dayOfWeek: UInt8 = 0x06
  static let dayOfMonth: UInt8 = 0x07
  static let month: UInt8 = 0x08
  static let year: UInt8 = 0x09
  static let statusA: UInt8 = 0x0A
  static let statusB: UInt8 = 0x0B
  static let statusC: UInt8 = 0x0C
  static let statusD: UInt8 = 0x0D
  static let century: UInt8 = 0x32

  static let binaryMode: UInt8 = 0x04
  static let twentyFourHourMode: UInt8 = 0x02

  var ram = [UInt8](repeating: 0, count: 128)
  var index: UInt8 = 0
  var nmiDisabled = false
  /// Guest time minus host time, in seconds.
  var offset: Int64 = 0

  init(memorySize: UInt64) {
    ram[Int(Self.statusA)] = 0x26
    ram[Int(Self.statusB)] = Self.twentyFourHourMode
    ram[Int(Self.statusD)] = 0x80
    storeMemorySizes(memorySize)
  }

  private mutating func storeMemorySizes(_ memorySize: UInt64) {
    let kib: UInt64 = 1024
    let mib: UInt64 = 1024 * kib
    let below4G = min(memorySize, GuestMemory.pciHoleStart)
    let above4G = memorySize - below4G
    storeLittleEndian(640, at: 0x15, bytes: 2)
    let extended = below4G > mib ? min((below4G - mib) / kib, 0xFFFF) : 0
    storeLittleEndian(extended, at: 0x17, bytes: 2)
    storeLittleEndian(extended, at: 0x30, bytes: 2)
    let above16M = below4G > 16 * mib ? min((below4G - 16 * mib) / (64 * kib), 0xFFFF) : 0
    storeLittleEndian(above16M, at: 0x34, bytes: 2)
    storeLittleEndian(min(above4G / (64 * kib), 0xFF_FFFF), at: 0x5B, bytes: 3)
    let checksum = ram[0x10...0x2D].reduce(UInt16(0)) { $0 &+ UInt16($1) }
    ram[0x2E] = UInt8(checksum >> 8)
    ram[0x2F] = UInt8(truncatingIfNeeded: checksum)
  }

  private mutating func storeLittleEndian(_ value: UInt64, at offset: Int, bytes: Int) {
    for index in 0..<bytes {
      ram[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index))
    }
  }

  var binary: Bool { ram[Int(Self.statusB)] & Self.binaryMode != 0 }
  var twentyFourHour: Bool { ram[Int(Self.statusB)] & Self.twentyFourHourMode != 0 }

  func encode(_ value: Int64) -> UInt8 {
    let clamped = UInt8(clamping: max(0, min(value, 99)))
    return binary ? clamped : (clamped / 10) << 4 | clamped % 10
  }

  /// Decodes a guest-written field; nonsense BCD digits still give a bounded number.
  func decode(_ byte: UInt8) -> Int64 {
    binary ? Int64(byte) : Int64(byte >> 4) * 10 + Int64(byte & 0x0F)
  }

  mutating func read(hostTime: Int64) -> UInt8 {
    let register = index
    switch register {
    case Self.seconds, Self.minutes, Self.hours, Self.dayOfWeek, Self.dayOfMonth, Self.month, Self.year,
      Self.century:
      return timeField(register, of: CalendarTime(secondsSinceEpoch: hostTime &+ offset))
    case Self.statusA:
      return ram[Int(register)] & 0x7F  // update in progress: never
    case Self.statusC:
      return 0  // no interrupt flags; reading clears them anyway
    case Self.statusD:
      return 0x80
    default:
      return ram[Int(register)]
    }
  }

  func timeField(_ register: UInt8, of time: CalendarTime) -> UInt8 {
    switch register {
    case Self.seconds: return encode(time.second)
    case Self.minutes: return encode(time.minute)
    case Self.hours:
      if twentyFourHour { return encode(time.hour) }
      let hour12 = time.hour % 12 == 0 ? 12 : time.hour % 12
      return encode(hour12) | (time.hour >= 12 ? 0x80 : 0)
    case Self.dayOfWeek: return encode(time.weekday + 1)
    case Self.dayOfMonth: return encode(time.day)
    case Self.month: return encode(time.month)
    case Self.year: return encode(CalendarTime.floorModulo(time.year, 100))
    default: return encode(CalendarTime.floorDivide(time.year, 100))
    }
  }

  mutating func write(_ byte: UInt8, hostTime: Int64) {
    let register = index
    switch register {
    case Self.seconds, Self.minutes, Self.hours, Self.dayOfMonth, Self.month, Self.year, Self.century:
      setTimeField(register, byte, hostTime: hostTime)
    case Self.dayOfWeek:
      break  // derived from the date
    case Self.statusA:
      ram[Int(register)] = byte & 0x7F
    case Self.statusC, Self.statusD:
      break  // read-only
    default:
      ram[Int(register)] = byte
    }
  }

  /// Moves the guest clock so that one field reads `byte`, keeping the others.
  private mutating func setTimeField(_ register: UInt8, _ byte: UInt8, hostTime: Int64) {
    var time = CalendarTime(secondsSinceEpoch: hostTime &+ offset)
    switch register {
    case Self.seconds: time.second = min(decode(byte), 59)
    case Self.minutes: time.minute = min(decode(byte), 59)
    case Self.hours:
      if twentyFourHour {
        time.hour = min(decode(byte), 23)
      } else {
        let hour12 = min(max(decode(byte & 0x7F), 1), 12) % 12
        time.hour = hour12 + (byte & 0x80 != 0 ? 12 : 0)
      }
    case Self.dayOfMonth: time.day = min(max(decode(byte), 1), 31)
    case Self.month: time.month = min(max(decode(byte), 1), 12)
    case Self.year: time.year = CalendarTime.floorDivide(time.year, 100) * 100 + min(decode(byte), 99)
    default: time.year = min(decode(byte), 99) * 100 + CalendarTime.floorModulo(time.year, 100)
    }
    let updated = CalendarTime(
      year: time.year, month: time.month, day: time.day, hour: time.hour, minute: time.minute, second: time.second)
    offset = updated.secondsSinceEpoch &- hostTime
  }
}

// MARK: Machine state

/// The 128 bytes of CMOS RAM, the index register, the NMI-disable bit and the guest's offset
/// from host time (so the RTC keeps the guest's setting relative to the host clock).
extension CMOSClock: StateSavable {
  public func saveState(into writer: inout StateWriter) {
    let saved = state.withLock { $0 }
    writer.write(bytes: saved.ram)
    writer.write(saved.index)
    writer.write(saved.nmiDisabled)
    writer.write(saved.offset)
  }

  public func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let ram = try reader.readBytes(exactly: 128, "CMOS RAM")
    let index: UInt8 = try reader.read()
    let nmiDisabled = try reader.readBool()
    let offset: Int64 = try reader.read()
    state.withLock { cmos in
      cmos.ram = ram
      cmos.index = index & 0x7F
      cmos.nmiDisabled = nmiDisabled
      cmos.offset = offset
    }
  }
}
