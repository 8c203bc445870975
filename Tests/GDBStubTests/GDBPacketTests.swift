import Testing
import VMCore

@testable import GDBStub

@Suite("gdb packet framing")
struct GDBPacketTests {
  @Test func framesAndChecksums() {
    var reader = GDBPacketReader()
    let framed = GDBWire.frame(Array("qSupported".utf8))
    #expect(reader.feed(framed) == [.packet(Array("qSupported".utf8))])
  }
}

/// A target with fixed registers and 64 KiB of RAM, for driving `Session` directly.
final class FakeTarget: GDBTarget, @unchecked Sendable {
  let memory: GuestMemory
  var file = GDBRegisterFile()
  var breakpoints: [GDBBreakpoint] = []
  var resumes: [Int?] = []

  init() throws {
    memory = try GuestMemory(size: 0x10000)
    file.general[0] = 0x1122_3344_5566_7788
    file.rip = 0x1000
  }

  var cpuCount: Int { 2 }
  var hasStarted: Bool { true }
  func setStopHandler(_ handler: @escaping @Sendable (GDBStopEvent) -> Void) {}
  func stop() -> Bool { true }
  func resume(step: Int?) { resumes.append(step) }
  func registers(cpu: Int) -> GDBRegisterFile? { cpu < cpuCount ? file : nil }
  func setRegisters(_ registers: GDBRegisterFile, cpu: Int) -> Bool {
    file = registers
    return true
  }
  func setBreakpoint(_ breakpoint: GDBBreakpoint, inserted: Bool) -> Bool {
    if inserted { breakpoints.append(breakpoint) } else { breakpoints.removeAll { $0 == breakpoint } }
    return breakpoint.kind != .read
  }
  func removeAllBreakpoints() { breakpoints.removeAll() }
}

@Suite("gdb protocol sessions")
struct GDBSessionProtocolTests {
  func reply(_ session: Session, _ packet: String) -> String? {
    session.handle(Array(packet.utf8)).reply.map { String(decoding: $0, as: UTF8.self) }
  }

  @Test func registersRoundTripThroughGAndP() throws {
    let target = try FakeTarget()
    let session = Session(target: target, startStopped: true)
    let all = try #require(reply(session, "g"))
    #expect(all.count == GDBTargetDescription.totalSize * 2)
    #expect(all.hasPrefix("8877665544332211"))
    // Register 16 is RIP.
    #expect(reply(session, "p10") == "0010000000000000")
    #expect(reply(session, "P10=0020000000000000") == "OK")
    #expect(target.file.rip == 0x2000)
    #expect(reply(session, "G" + all) == "OK")
    #expect(target.file.rip == 0x1000)
  }

  @Test func memoryIsReadAndWrittenAtPhysicalAddressesWithPagingOff() throws {
    let target = try FakeTarget()
    let session = Session(target: target, startStopped: true)
    #expect(reply(session, "M100,4:deadbeef") == "OK")
    #expect(reply(session, "m100,4") == "deadbeef")
    #expect(try target.memory.read(UInt32.self, at: 0x100) == 0xEFBE_ADDE)
    #expect(reply(session, "mfffff,4")?.hasPrefix("E") == true)
  }

  @Test func targetDescriptionIsServedInPieces() throws {
    let session = Session(target: try FakeTarget(), startStopped: true)
    var document = ""
    var offset = 0
    while true {
      let part = try #require(reply(session, "qXfer:features:read:target.xml:\(String(offset, radix: 16)),100"))
      document += part.dropFirst()
      offset += part.utf8.count - 1
      if part.hasPrefix("l") { break }
      #expect(part.hasPrefix("m"))
    }
    #expect(document == GDBTargetDescription.xml)
    #expect(document.contains("<architecture>i386:x86-64</architecture>"))
  }

  @Test func vContStepsTheNamedThread() throws {
    let target = try FakeTarget()
    let session = Session(target: target, startStopped: true)
    let outcome = session.handle(Array("vCont;s:2;c".utf8))
    #expect(outcome.reply == nil && outcome.resumed)
    #expect(target.resumes == [1])
  }

  /// Malformed and hostile packets get an error or empty reply; none traps.
  @Test func malformedPacketsAreAnsweredWithoutTrapping() throws {
    let target = try FakeTarget()
    let session = Session(target: target, startStopped: true)
    let hostile = [
      "m", "m,", "mffffffffffffffffff,1", "m0,ffffffff", "M0,2:zz", "M0,4:00", "X0,4:", "P", "P99=00", "Pzz=",
      "G00", "p", "pfffffffffffffffff", "Z0", "Z9,0,1", "Z2,0,0", "z0,,", "Hg", "Hgzz", "Hx1", "T0", "T99",
      "qXfer:features:read:other.xml:0,10", "qXfer:features:read:target.xml:ffffff,10",
      "qXfer:features:read:target.xml", "qRcmd,zz", "qRcmd," + GDBWire.hex(Array("xp 0xffffffffff 4096".utf8)),
      "qThreadExtraInfo,99", "vCont;x", "vCont;s:zz", "c zz", "s1,2", "",
    ]
    for packet in hostile {
      _ = session.handle(Array(packet.utf8))
    }
    var generator = SystemRandomNumberGenerator()
    var reader = GDBPacketReader()
    for _ in 0..<2000 {
      let length = Int.random(in: 0..<64, using: &generator)
      let noise = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
      for event in reader.feed(noise) {
        if case .packet(let payload) = event, payload.first != UInt8(ascii: "k"),
          !payload.starts(with: Array("vKill".utf8))
        {
          _ = session.handle(payload)
        }
      }
      _ = session.handle([UInt8(ascii: "q")] + noise)
      _ = session.handle([UInt8(ascii: "Z")] + noise)
      _ = session.handle([UInt8(ascii: "m")] + noise)
    }
    // The session still answers normally.
    #expect(reply(session, "p10")?.count == 16)
  }

  /// A breakpoint type of 16 hex digits above Int.max is an unknown type (empty reply), not a
  /// trap of the integer conversion (found by the `gdb` fuzz target).
  @Test func breakpointTypesBeyondIntAreUnknown() throws {
    let target = try FakeTarget()
    let session = Session(target: target, startStopped: true)
    #expect(reply(session, "Z8000000000000000,1000,1") == "")
    #expect(reply(session, "zffffffffffffffff,1000,1") == "")
    #expect(target.breakpoints.isEmpty)
    #expect(reply(session, "Z1,1000,1") == "OK")
  }

  @Test func corruptChecksumsAreRejected() {
    var reader = GDBPacketReader()
    #expect(reader.feed(Array("$g#00".utf8)) == [.corrupt])
    #expect(reader.feed([0x03]) == [.interrupt])
    #expect(reader.feed(Array("$g#67".utf8)) == [.packet([UInt8(ascii: "g")])])
  }
}
