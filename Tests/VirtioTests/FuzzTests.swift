import Glibc
import PCI
import Testing
import VMCore

@testable import Virtio

/// Random descriptor tables and rings: the walker never crashes and never touches memory
/// outside guest RAM (GuestMemory is the only path; RAM here is small so random addresses
/// mostly fall outside it).
@Suite struct FuzzTests {
  struct Generator {
    var state: UInt64
    mutating func next() -> UInt64 {
      state ^= state << 13
      state ^= state >> 7
      state ^= state << 17
      return state
    }
    mutating func below(_ bound: UInt64) -> UInt64 { next() % bound }
  }

  @Test func randomRingsNeverEscapeGuestRAM() throws {
    let memory = try GuestMemory(size: 1 << 20)
    var random = Generator(state: 0x9E37_79B9_7F4A_7C15)
    var chain = DescriptorChain()
    var errors = 0
    var chains = 0
    for _ in 0..<5000 {
      let size = UInt16(1) << random.below(6)
      var queue = SplitVirtqueue(memory: memory, maxSize: 256)
      queue.size = size
      queue.descriptorTable = 0x1000
      queue.availableRing = 0x2000
      queue.usedRing = 0x3000
      queue.eventIndex = random.below(2) == 0
      queue.indirectDescriptors = random.below(2) == 0
      #expect(throws: Never.self) { try queue.validate() }
      queue.isEnabled = true
      // Random descriptors: addresses near RAM, inside, or anywhere; random flags and links.
      for index in 0..<UInt64(size) {
        let at = 0x1000 + 16 * index
        let address: UInt64
        switch random.below(4) {
        case 0: address = random.next()
        case 1: address = 0xF_0000 + random.below(0x2_0000)
        default: address = 0x4000 + random.below(0x8000)
        }
        try memory.write(address, at: at)
        try memory.write(
          UInt32(truncatingIfNeeded: random.below(4) == 0 ? random.next() : random.below(0x2000)), at: at + 8)
        try memory.write(UInt16(truncatingIfNeeded: random.below(8)), at: at + 12)
        try memory.write(UInt16(truncatingIfNeeded: random.below(UInt64(size) + 2)), at: at + 14)
      }
      // Indirect tables pointing back into the descriptor area or at random data.
      for index in 0..<UInt64(size) {
        try memory.write(UInt16(truncatingIfNeeded: random.below(UInt64(size) + 1)), at: 0x2004 + 2 * index)
      }
      try memory.write(UInt16(truncatingIfNeeded: random.below(UInt64(size) * 2 + 2)), at: 0x2002)
      for _ in 0..<4 {
        do throws(VirtqueueError) {
          guard try queue.popAvailable(into: &chain) else { break }
          chains += 1
          for buffer in chain.buffers {
            #expect(memory.hostPointer(buffer.address, length: max(UInt64(buffer.length), 1)) != nil)
          }
          // Use the chain as a device would: write everything writable, read everything readable.
          var scratch = [UInt8](repeating: 0x5A, count: 256)
          _ = scratch.withUnsafeMutableBytes { chain.read(from: memory, offset: 0, into: $0) }
          _ = scratch.withUnsafeBytes { chain.write(to: memory, offset: 0, from: $0) }
          try queue.pushUsed(head: chain.head, length: 0)
          _ = try queue.takeInterruptDecision()
        } catch {
          errors += 1
          break
        }
      }
    }
    #expect(errors > 1000)
    #expect(chains > 100)
  }

  @Test func randomRegisterWritesKeepTheTransportAlive() throws {
    let machine = try TestMachine()
    let driver = try VirtioDriver(machine: machine, model: VirtioEntropy())
    var random = Generator(state: 12345)
    for _ in 0..<20000 {
      let offset = random.below(0x8000)
      let size = [1, 2, 4, 8][Int(random.below(4))]
      if random.below(2) == 0 {
        machine.bus.mmioWrite(driver.bar0 + offset, size: size, value: random.next())
      } else {
        _ = machine.bus.mmioRead(driver.bar0 + offset, size: size)
      }
      if random.below(64) == 0 { driver.notify(Int(random.below(3))) }
    }
    // The BAR may have moved or decoding been switched off by config writes? Only BAR writes
    // happened, so the device still answers.
    #expect(driver.common(0x12, size: 2) == 1)
  }
}
