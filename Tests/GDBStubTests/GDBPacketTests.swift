import Testing

@testable import GDBStub

@Suite("gdb packet framing")
struct GDBPacketTests {
  @Test func framesAndChecksums() {
    var reader = GDBPacketReader()
    let framed = GDBWire.frame(Array("qSupported".utf8))
    #expect(reader.feed(framed) == [.packet(Array("qSupported".utf8))])
  }
}
