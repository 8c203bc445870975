import Foundation
import TestSupport

/// The start of a 32-bit Multiboot v1 guest in GNU as syntax: the header (magic, flags 3,
/// checksum) in `.text` from Tests/GuestPrograms/include/multiboot.inc, then `_start`, which the
/// guest source continues (the sources are assembled with `guestIncludeFolder`).
let multibootPrologue = """
          .include "multiboot.inc"

  """

/// `multibootPrologue` and the start of `_start` for a guest that takes interrupt `vector`: the
/// stack at `stack_top`, both 8259s masked, an interrupt gate for `vector` that enters
/// `handler`, and LIDT. The guest's source continues after it and ends with
/// `interruptGuestTables`.
func interruptGuestStart(vector: Int) -> String {
  let gate = "idt + 0x\(String(vector, radix: 16)) * 8"
  return multibootPrologue + """
    _start:
            movl $stack_top, %esp
            movb $0xFF, %al
            outb %al, $0x21
            outb %al, $0xA1
            movl $handler, %eax
            movw %ax, \(gate)
            movw %cs, %bx
            movw %bx, \(gate) + 2
            movw $0x8E00, \(gate) + 4
            shrl $16, %eax
            movw %ax, \(gate) + 6
            lidt idtr

    """
}

/// The end of an `interruptGuestStart` guest, in its `.data` section: the IDT register, a
/// 256-gate IDT and a 4 KiB stack that ends at `stack_top`.
let interruptGuestTables = """
          .include "interrupt-tables.inc"

  """

/// Assembles `source` (32-bit GNU as syntax) into an ELF linked at 1 MiB.
func assembleGuest(_ source: String, in scratch: ScratchDirectory) throws -> String {
  try assembleGuest(source, bits: 32, in: scratch)
}

/// Assembles a 64-bit guest into an ELF64 image linked at 1 MiB (entered in long mode).
func assembleGuest64(_ source: String, in scratch: ScratchDirectory) throws -> String {
  try assembleGuest(source, bits: 64, in: scratch)
}

/// Assembles `source` with GNU as (`--32` or `--64`) and links it at 1 MiB with ld.
private func assembleGuest(_ source: String, bits: Int, in scratch: ScratchDirectory) throws -> String {
  let sourcePath = scratch.path("guest\(bits).S")
  try source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
  return try assembleAndLink(sourcePath, bits: bits, linkAt: "0x100000", into: scratch.path("guest\(bits)"))
}

/// The folder `.include`d files of the guest sources live in (Tests/GuestPrograms/include).
let guestIncludeFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
  .appendingPathComponent("GuestPrograms/include").path

/// Assembles the GNU as file at `sourcePath` (`--32` or `--64`, with `guestIncludeFolder` for
/// `.include`) into `output`.o and links it with ld at `address` into `output`.elf, whose path
/// it returns.
func assembleAndLink(_ sourcePath: String, bits: Int, linkAt address: String, into output: String) throws -> String {
  let object = output + ".o"
  let image = output + ".elf"
  for (tool, arguments) in [
    ("/usr/bin/as", ["--\(bits)", "-I", guestIncludeFolder, "-o", object, sourcePath]),
    ("/usr/bin/ld", ["-m", bits == 64 ? "elf_x86_64" : "elf_i386", "-Ttext", address, "-o", image, object]),
  ] {
    try HostCommand.check(tool, arguments)
  }
  return image
}
