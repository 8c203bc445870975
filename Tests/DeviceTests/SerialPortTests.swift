import Devices
import Foundation
import Glibc
import Testing
import VMCore

/// UART register offsets from COM1's base.
private let thr: UInt16 = 0x3F8
private let ier: UInt16 = 0x3F9
private let iir: UInt16 = 0x3FA
private let lcr: UInt16 = 0x3FB
private let mcr: UInt16 = 0x3FC
private let lsr: UInt16 = 0x3FD
private let msr: UInt16 = 0x3FE
private let scr: UInt16 = 0x3FF
private let irq4: UInt32 = 4

@Suite("16550A UART")
struct SerialPortTests {
  @Test func transmittedBytesReachTheBackend() throws {
    let machine = try LegacyMachine()
    for byte in "Hello, COM1\n".utf8 {
      #expect(machine.inb(lsr) & 0x20 != 0, "THR empty before each byte")
      machine.outb(thr, byte)
    }
    #expect(machine.serialOutput.text == "Hello, COM1\n")
    #expect(machine.inb(lsr) & 0x61 == 0x60, "THRE and TEMT set, no data ready")
  }

  @Test func scratchRegisterHoldsAnyValue() throws {
    let machine = try LegacyMachine()
    for value: UInt8 in [0x00, 0x55, 0xAA, 0xFF, 0x5A] {
      machine.outb(scr, value)
      #expect(machine.inb(scr) == value)
    }
  }

  @Test func interruptEnableKeepsFourBits() throws {
    let machine = try LegacyMachine()
    machine.outb(ier, 0x00)
    #expect(machine.inb(ier) == 0x00)
    machine.outb(ier, 0x0F)
    #expect(machine.inb(ier) == 0x0F)
    machine.outb(ier, 0xFF)
    #expect(machine.inb(ier) == 0x0F)
    machine.outb(ier, 0)
  }

  @Test func divisorLatchIsSelectedByDLAB() throws {
    let machine = try LegacyMachine()
    machine.outb(lcr, 0x80)
    machine.outb(thr, 0x01)  // DLL: 115200 baud
    machine.outb(ier, 0x02)  // DLM
    #expect(machine.inb(thr) == 0x01)
    #expect(machine.inb(ier) == 0x02)
    machine.outb(lcr, 0x03)  // 8N1, DLAB off
    #expect(machine.devices.serialPort.divisor == 0x0201)
    #expect(machine.inb(lcr) == 0x03)
    #expect(machine.inb(ier) == 0x00, "IER untouched by divisor writes")
    #expect(machine.serialOutput.bytes.isEmpty, "divisor writes are not transmitted")
  }

  @Test func fifoEnableIsReportedInIIRBits6And7() throws {
    let machine = try LegacyMachine()
    #expect(machine.inb(iir) == 0x01, "no FIFO, no interrupt after reset")
    machine.outb(iir, 0x01)  // FCR: enable FIFOs
    #expect(machine.inb(iir) & 0xC0 == 0xC0)
    machine.outb(iir, 0x00)
    #expect(machine.inb(iir) & 0xC0 == 0x00)
  }

  @Test func loopbackWiresTransmitterToReceiverAndModemLines() throws {
    let machine = try LegacyMachine()
    machine.outb(mcr, 0x10)
    #expect(machine.inb(msr) & 0xF0 == 0x00)
    machine.outb(mcr, 0x1A)  // loopback, RTS, OUT2: as Linux's 8250 probe does
    #expect(machine.inb(msr) & 0xF0 == 0x90)
    machine.outb(mcr, 0x1F)
    #expect(machine.inb(msr) & 0xF0 == 0xF0)
    machine.outb(thr, 0x41)
    #expect(machine.serialOutput.bytes.isEmpty, "loopback output never leaves the UART")
    #expect(machine.inb(lsr) & 0x01 == 0x01)
    #expect(machine.inb(thr) == 0x41)
    #expect(machine.inb(lsr) & 0x01 == 0x00)

    // Host input waits while the receiver is looped back.
    machine.devices.serialPort.receive([0x42])
    #expect(machine.inb(lsr) & 0x01 == 0x00)
    machine.outb(mcr, 0x03)
    #expect(machine.inb(msr) & 0xF0 == 0xB0, "a ready modem outside loopback")
    #expect(machine.inb(lsr) & 0x01 == 0x01)
    #expect(machine.inb(thr) == 0x42)
  }

  @Test func receivedDataRaisesAndClearsTheInterrupt() throws {
    let machine = try LegacyMachine()
    machine.outb(iir, 0x07)  // FIFOs on and cleared, trigger level 1
    machine.outb(ier, 0x01)
    #expect(!machine.sink.level(irq4))
    #expect(machine.inb(iir) == 0xC1)

    machine.devices.serialPort.receive(Array("abc".utf8))
    #expect(machine.sink.level(irq4))
    #expect(machine.devices.serialPort.interruptLevel)
    #expect(machine.inb(iir) == 0xC4)
    var received: [UInt8] = []
    while machine.inb(lsr) & 0x01 != 0 { received.append(machine.inb(thr)) }
    #expect(received == Array("abc".utf8))
    #expect(machine.inb(iir) == 0xC1)
    #expect(!machine.sink.level(irq4))
  }

  @Test func triggerLevelSeparatesTimeoutFromDataAvailable() throws {
    let machine = try LegacyMachine()
    machine.outb(iir, 0x81)  // FIFOs on, trigger level 8
    machine.outb(ier, 0x01)
    machine.devices.serialPort.receive([1, 2, 3])
    #expect(machine.inb(iir) == 0xCC, "below the trigger level: character timeout")
    machine.devices.serialPort.receive([4, 5, 6, 7, 8])
    #expect(machine.inb(iir) == 0xC4, "at the trigger level: data available")
    #expect(machine.sink.level(irq4))
    machine.outb(iir, 0x83)  // clear the receive FIFO
    #expect(machine.inb(lsr) & 0x01 == 0)
    #expect(!machine.sink.level(irq4))
  }

  @Test func inputBeyondTheFIFOWaitsAndArrivesInOrder() throws {
    let machine = try LegacyMachine()
    machine.outb(iir, 0x01)
    let message = Array((0..<200).map { UInt8(truncatingIfNeeded: $0 &* 7) })
    #expect(machine.devices.serialPort.receive(message) == 200)
    #expect(machine.devices.serialPort.pendingInputCount == 200)
    var received: [UInt8] = []
    while machine.inb(lsr) & 0x01 != 0 { received.append(machine.inb(thr)) }
    #expect(received == message)
    #expect(machine.devices.serialPort.pendingInputCount == 0)
  }

  @Test func hostInputFromAnotherThreadKeepsOrder() throws {
    let machine = try LegacyMachine()
    machine.outb(iir, 0x01)
    let total = 20_000
    let port = machine.devices.serialPort
    // A real host thread (as the terminal reader is), not a task: the cooperative pool may be
    // fully occupied by other tests.
    let finished = DispatchSemaphore(value: 0)
    let producer = Thread {
      var next = 0
      while next < total {
        let chunk = (next..<min(next + 97, total)).map { UInt8(truncatingIfNeeded: $0) }
        next += port.receive(chunk)
        if next < total { sched_yield() }
      }
      finished.signal()
    }
    producer.start()
    var received = 0
    var inOrder = true
    let deadline = time(nil) + 60
    while received < total && time(nil) < deadline {
      if machine.inb(lsr) & 0x01 != 0 {
        if machine.inb(thr) != UInt8(truncatingIfNeeded: received) { inOrder = false }
        received += 1
      } else {
        sched_yield()
      }
    }
    #expect(received == total)
    #expect(inOrder)
    #expect(finished.wait(timeout: .now() + 10) == .success)
  }

  @Test func transmitterEmptyInterruptFollowsIEROnIIRReadAndTHRWrite() throws {
    let machine = try LegacyMachine()
    machine.outb(iir, 0x01)
    machine.outb(ier, 0x02)
    #expect(machine.sink.level(irq4), "enabling ETBEI with THR empty raises the interrupt")
    #expect(machine.inb(iir) == 0xC2)
    #expect(!machine.sink.level(irq4), "reading IIR clears a THRE interrupt")
    #expect(machine.inb(iir) == 0xC1)

    machine.sink.clearHistory()
    machine.outb(thr, 0x58)
    #expect(machine.sink.level(irq4), "THR empties again after a write")
    #expect(machine.sink.risingEdges(irq4) == 1)
    #expect(machine.serialOutput.bytes == [0x58])

    // Writing THR while the interrupt is pending lowers and raises the line: a new edge.
    machine.sink.clearHistory()
    machine.outb(thr, 0x59)
    #expect(machine.sink.history(irq4) == [false, true])

    machine.outb(ier, 0x00)
    #expect(!machine.sink.level(irq4))
    #expect(machine.inb(iir) == 0xC1)
  }

  @Test func linuxTHREReassertionProbeSeesTheInterruptTwice() throws {
    // serial8250_do_startup: IER=THRI, read IIR, IER=0, IER=THRI, read IIR.
    let machine = try LegacyMachine()
    machine.outb(ier, 0x02)
    let first = machine.inb(iir)
    machine.outb(ier, 0x00)
    machine.outb(ier, 0x02)
    let second = machine.inb(iir)
    machine.outb(ier, 0x00)
    #expect(first & 0x0F == 0x02)
    #expect(second & 0x0F == 0x02)
  }

  @Test func linuxAutoconfigSequenceFindsA16550A() throws {
    // The register dance of Linux's 8250 autoconfig(), condensed: existence test through IER,
    // loopback test, FIFO detection, then the probes for look-alikes, which must all say no.
    let machine = try LegacyMachine()
    machine.outb(ier, 0x00)
    #expect(machine.inb(ier) & 0x0F == 0x00)
    machine.outb(ier, 0x0F)
    #expect(machine.inb(ier) & 0x0F == 0x0F)
    machine.outb(ier, 0x00)

    let savedMCR = machine.inb(mcr)
    machine.outb(mcr, 0x10 | 0x0A)
    #expect(machine.inb(msr) & 0xF0 == 0x90)
    machine.outb(mcr, savedMCR)

    machine.outb(lcr, 0xBF)
    machine.outb(iir, 0x00)  // EFR write on a 16650; FCR here
    machine.outb(lcr, 0x00)
    machine.outb(iir, 0x01)
    #expect(machine.inb(iir) >> 6 == 3, "16550A: FIFOs reported enabled")

    machine.outb(lcr, 0x80)
    #expect(machine.inb(iir) != 0, "no EFR behind DLAB: not a 16650")
    machine.outb(lcr, 0xBF)
    #expect(machine.inb(iir) != 0)
    machine.outb(lcr, 0x00)
    let canary = machine.inb(ier)
    machine.outb(ier, canary | 0x40)
    #expect(machine.inb(ier) & 0x40 == 0, "no UART-unit-enable bit: not an XScale")
    machine.outb(ier, canary)
    machine.outb(iir, 0x01 | 0x20)
    #expect(machine.inb(iir) & 0xE0 == 0xC0, "no 64-byte FIFO: not a 16750")
    machine.outb(iir, 0x00)
    #expect(machine.inb(lsr) != 0xFF, "the LSR safety check passes")
  }

  @Test func overrunSetsLineStatusAndItsInterrupt() throws {
    let machine = try LegacyMachine()
    machine.outb(mcr, 0x10)  // loopback, FIFOs off: one holding register
    machine.outb(ier, 0x05)
    machine.outb(thr, 0x31)
    machine.outb(thr, 0x32)
    #expect(machine.inb(iir) == 0x06, "line status has the highest priority")
    let status = machine.inb(lsr)
    #expect(status & 0x03 == 0x03, "data ready and overrun")
    #expect(machine.inb(lsr) & 0x02 == 0, "reading LSR clears the error")
    #expect(machine.inb(iir) == 0x04)
    #expect(machine.inb(thr) == 0x32, "without FIFOs the newer byte replaces the older")
  }

  @Test func modemStatusChangesInLoopbackRaiseTheModemInterrupt() throws {
    let machine = try LegacyMachine()
    machine.outb(mcr, 0x10)
    _ = machine.inb(msr)
    machine.outb(ier, 0x08)
    machine.outb(mcr, 0x12)  // RTS -> CTS changes
    #expect(machine.sink.level(irq4))
    #expect(machine.inb(iir) == 0x00)
    #expect(machine.inb(msr) == 0x11, "CTS with its delta bit")
    #expect(machine.inb(iir) == 0x01, "reading MSR clears the deltas")
    #expect(!machine.sink.level(irq4))
  }

  @Test func wideAccessesSplitIntoConsecutiveRegisters() throws {
    let machine = try LegacyMachine()
    machine.outb(scr, 0x77)
    let pair = machine.bus.portRead(msr, size: 2)
    #expect(pair >> 8 == 0x77, "the high byte is the scratch register")
    #expect(machine.bus.portRead(scr, size: 2) == 0xFF77, "the byte past the UART reads as all ones")
    machine.bus.portWrite(lcr, size: 2, value: 0x0003)  // LCR=3, MCR=0
    #expect(machine.inb(lcr) == 0x03)
  }

  @Test func fileBackendReportsAnUnopenablePath() {
    #expect(throws: SerialBackendError.self) {
      try BufferedSerialBackend(appendingTo: "/nonexistent-directory-\(getpid())/serial.log")
    }
    do {
      _ = try BufferedSerialBackend(appendingTo: "/nonexistent-directory/serial.log")
    } catch {
      #expect(error.description.contains("/nonexistent-directory/serial.log"))
      #expect(error.description.contains("No such file"))
    }
  }

  @Test func nullBackendDiscards() {
    let port = SerialPort(interrupt: InterruptLine(router: InterruptRouter(), line: 4), backend: NullSerialBackend())
    port.portWrite(port: 0x3F8, size: 1, value: 0x41)
    #expect(port.portRead(port: 0x3FD, size: 1) & 0x60 == 0x60)
  }
}

func readWholeFile(_ path: String) throws -> String {
  let fd = open(path, O_RDONLY)
  guard fd >= 0 else { throw FileReadError(path: path, errno: errno) }
  defer { close(fd) }
  var bytes: [UInt8] = []
  var buffer = [UInt8](repeating: 0, count: 4096)
  while true {
    let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    if count <= 0 { break }
    bytes += buffer[0..<count]
  }
  return String(decoding: bytes, as: UTF8.self)
}

struct FileReadError: Error {
  let path: String
  let errno: Int32
}
