import Devices
import Glibc
import PCI
import Testing
import VMCore

@testable import Virtio

@Suite struct EntropyTests {
  @Test func returnsRandomBytes() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    driver.start(queueCount: 1)
    let queue = driver.queues[0]
    try machine.memory.fill(0, at: 0x40_0000, length: 256)
    queue.submit([(0x40_0000, 128, true), (0x40_0080, 128, true)])
    #expect(queue.waitForUsed(1))
    #expect(queue.usedElement(0).length == 256)
    let bytes = try machine.memory.readBytes(at: 0x40_0000, count: 256)
    #expect(bytes.filter { $0 == 0 }.count < 32)
    #expect(try machine.memory.read(UInt8.self, at: 0x40_0100) == 0)
  }

  @Test func deviceReadableBufferNeedsReset() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    driver.start(queueCount: 1)
    try machine.memory.fill(0x77, at: 0x40_0000, length: 64)
    driver.queues[0].submit([(0x40_0000, 64, false)])
    #expect(driver.waitForNeedsReset())
    #expect(try machine.memory.readBytes(at: 0x40_0000, count: 64) == [UInt8](repeating: 0x77, count: 64))
  }
}

@Suite struct ConsoleTests {
  @Test func transmitsToTheBackendAndReceivesHostInput() throws {
    let machine = try TestMachine()
    let capture = CapturingSerialBackend()
    let console = VirtioConsole(backend: capture)
    let driver = try VirtioDriver(machine: machine, model: console)
    #expect(driver.common(0x12, size: 2) == 2)
    driver.start(queueCount: 2)
    let message = Array("hello from the guest\n".utf8)
    try machine.memory.writeBytes(message, at: 0x40_0000)
    driver.queues[1].submit([(0x40_0000, 6, false), (0x40_0006, UInt32(message.count - 6), false)])
    #expect(driver.queues[1].waitForUsed(1))
    #expect(capture.text == "hello from the guest\n")
    // Host input waits for a receive buffer, then fills it.
    console.receive(Array("typed".utf8))
    usleep(10000)
    try machine.memory.fill(0, at: 0x41_0000, length: 64)
    driver.queues[0].submit([(0x41_0000, 3, true)])
    #expect(driver.queues[0].waitForUsed(1))
    #expect(driver.queues[0].usedElement(0).length == 3)
    driver.queues[0].submit([(0x41_0010, 64, true)])
    #expect(driver.queues[0].waitForUsed(2))
    #expect(driver.queues[0].usedElement(1).length == 2)
    #expect(try machine.memory.readBytes(at: 0x41_0000, count: 3) == Array("typ".utf8))
    #expect(try machine.memory.readBytes(at: 0x41_0010, count: 2) == Array("ed".utf8))
  }

  @Test func emergencyWriteGoesStraightOut() throws {
    let machine = try TestMachine()
    let capture = CapturingSerialBackend()
    let driver = try VirtioDriver(machine: machine, model: VirtioConsole(backend: capture))
    driver.start(features: VirtioConsole.emergencyWriteFeature, queueCount: 2)
    machine.bus.mmioWrite(driver.bar0 + driver.deviceConfigOffset + 8, size: 4, value: UInt64(UInt8(ascii: "!")))
    #expect(capture.text == "!")
  }

  /// Output behind a consumer that stopped reading waits in the guest's ring: the worker takes
  /// no more than the backend holds, still serves host input, loses nothing, and everything
  /// arrives in order once the consumer reads again.
  @Test func outputWaitsInTheRingWhileTheConsumerStopsReading() throws {
    let machine = try TestMachine()
    var ends: [Int32] = [-1, -1]
    try #require(pipe(&ends) == 0)
    defer { close(ends[0]) }
    // The backend owns the write end.
    let backend = try BufferedSerialBackend(fileDescriptor: ends[1], ownsDescriptor: true, capacity: 16 << 10)
    let console = VirtioConsole(backend: backend)
    let driver = try VirtioDriver(machine: machine, model: console)
    driver.start(queueCount: 2, size: 128)
    // 64 buffers of 4 KiB: four times what the pipe (64 KiB) and the backend (16 KiB) hold.
    let chunk = 4096
    let count = 64
    var sent: [UInt8] = []
    for index in 0..<count {
      let bytes = (0..<chunk).map { UInt8(truncatingIfNeeded: $0 / 7 &+ index &* 13) }
      try machine.memory.writeBytes(bytes, at: 0x40_0000 + UInt64(index * chunk))
      sent += bytes
      driver.queues[1].submit([(0x40_0000 + UInt64(index * chunk), UInt32(chunk), false)])
    }
    usleep(300_000)
    #expect(driver.queues[1].usedIndex < UInt16(count), "the worker took all the output with nobody reading")
    // Host input still reaches the guest: the worker is not stuck in a write.
    console.receive(Array("typed".utf8))
    driver.queues[0].submit([(0x48_0000, 64, true)])
    #expect(driver.queues[0].waitForUsed(1))
    #expect(try machine.memory.readBytes(at: 0x48_0000, count: 5) == Array("typed".utf8))
    // Once the consumer reads, the rest goes out, in order.
    var received: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    let deadline = ContinuousClock.now + .seconds(10)
    while received.count < sent.count && ContinuousClock.now < deadline {
      var ready = pollfd(fd: ends[0], events: Int16(POLLIN), revents: 0)
      guard poll(&ready, 1, 100) > 0 else { continue }
      let read = Glibc.read(ends[0], &buffer, buffer.count)
      if read > 0 { received += buffer[0..<read] }
    }
    #expect(driver.queues[1].waitForUsed(UInt16(count)))
    #expect(backend.droppedBytes == 0)
    #expect(received.count == sent.count)
    let same = received == sent
    #expect(same, "the output arrived altered or out of order")
  }

  @Test func writableTransmitBufferNeedsReset() throws {
    let machine = try TestMachine()
    let capture = CapturingSerialBackend()
    let driver = try VirtioDriver(machine: machine, model: VirtioConsole(backend: capture))
    driver.start(queueCount: 2)
    driver.queues[1].submit([(0x40_0000, 16, true)])
    #expect(driver.waitForNeedsReset())
    #expect(capture.bytes.isEmpty)
  }
}
