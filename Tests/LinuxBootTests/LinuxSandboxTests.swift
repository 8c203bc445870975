import Foundation
import Testing

/// Debian's kernel on the software CPU boots, reads and writes its virtio disk and powers off
/// with the VMM sandboxed (docs/isolation.md): jailed in an empty root, nobody, no
/// capabilities, seccomp filters per thread kind.
@Suite(
  "Linux under the sandboxed VMM", .serialized,
  .enabled(if: getuid() == 0, "the sandbox needs root"))
struct LinuxSandboxTests {
  @Test
  func bootsAndDoesDiskIOSandboxed() async throws {
    let scratch = try LinuxVirtioTests.ScratchFolder()
    let image = scratch.path("disk.img")
    let hostPhrase = "written by the host \(UInt64.random(in: 0...UInt64.max))"
    let guestPhrase = "written by the guest \(UInt64.random(in: 0...UInt64.max))"
    var content = Data(hostPhrase.utf8)
    content.append(Data(repeating: 0, count: (16 << 20) - content.count))
    try content.write(to: URL(fileURLWithPath: image))

    let session = try await LinuxVirtioTests.boot(
      ["--serial", "stdio", "--disk", image, "--sandbox", "--sandbox-probe", "report", "--verbose"],
      cmdline: "console=ttyS0 panic=-1 loglevel=4 hostvisor.modules=virtio_pci,virtio_blk")
    defer { session.saveTranscript(name: "sandbox-linux") }
    #expect(session.text.contains("hostvisor: sandbox: entered (root: empty;"))
    #expect(session.text.contains("sandbox-probe: cwd / /proc absent"))

    // The VMM seen from outside while the guest runs.
    let supervisor = session.process.processIdentifier
    let children = try String(contentsOfFile: "/proc/\(supervisor)/task/\(supervisor)/children", encoding: .utf8)
    let child = try #require(children.split(separator: " ").first.map(String.init))
    let status = try String(contentsOfFile: "/proc/\(child)/status", encoding: .utf8)
    #expect(status.contains("CapEff:\t0000000000000000"))
    #expect(status.contains("Seccomp:\t2"))
    #expect(status.contains("NoNewPrivs:\t1"))

    // The guest reads what the host wrote and writes a sector the host then reads.
    let read = try await session.run("head -c \(hostPhrase.utf8.count) /dev/vda; echo")
    #expect(read.contains(hostPhrase), "\(read)")
    let written = try await session.run(
      "printf '\(guestPhrase)' | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null && sync && echo WRITE-OK",
      timeout: .seconds(180))
    #expect(written.contains("WRITE-OK"), "\(written)")
    session.type("poweroff -f\n")
    #expect(try await session.waitForExit(timeout: .seconds(120)) == 0)
    let after = try Data(contentsOf: URL(fileURLWithPath: image))
    #expect(String(decoding: after[512..<(512 + guestPhrase.utf8.count)], as: UTF8.self) == guestPhrase)
  }
}
