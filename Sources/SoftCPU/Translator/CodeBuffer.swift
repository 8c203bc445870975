import Glibc

/// Executable memory for one vCPU's translated blocks, never writable and executable at once.
///
/// The buffer is one anonymous mapping of `capacity` bytes, bump-allocated. Code is assembled
/// into an ordinary array first; `install` then makes the pages it lands on read-write, copies
/// it in and makes them read-execute again (W^X: a page is RW or RX, never both). When the
/// buffer is full the owner flushes everything (`reset`) and translates again. Each vCPU has
/// its own buffer and only its own thread writes or runs it, so no other thread can be executing
/// a page while it is writable.
final class CodeBuffer {
  /// Start of the mapping.
  let base: UnsafeMutableRawPointer
  /// Size of the mapping in bytes (a multiple of the page size).
  let capacity: Int
  /// Bytes in use.
  private(set) var used = 0
  /// Flushes since creation (for statistics and tests).
  private(set) var flushes = 0

  private static let pageSize = 4096

  /// Maps `capacity` bytes (rounded up to pages), read-execute and empty. Nil when the host
  /// refuses executable mappings.
  init?(capacity: Int) {
    let size = (capacity + Self.pageSize - 1) & ~(Self.pageSize - 1)
    guard let mapping = mmap(nil, size, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
      mapping != MAP_FAILED
    else { return nil }
    base = mapping
    self.capacity = size
  }

  deinit {
    munmap(base, capacity)
  }

  /// Whether `length` more bytes fit.
  func fits(_ length: Int) -> Bool {
    used + length <= capacity
  }

  /// Copies `code` into the buffer and returns its executable address, or nil when it does not
  /// fit (the caller then calls `reset` and translates again) or the protection change fails.
  func install(_ code: [UInt8]) -> UnsafeRawPointer? {
    guard !code.isEmpty, fits(code.count) else { return nil }
    let start = used
    let firstPage = start & ~(Self.pageSize - 1)
    let end = start + code.count
    let lastPage = (end + Self.pageSize - 1) & ~(Self.pageSize - 1)
    let pages = base + firstPage
    guard mprotect(pages, lastPage - firstPage, PROT_READ | PROT_WRITE) == 0 else { return nil }
    code.withUnsafeBytes { bytes in
      (base + start).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
    }
    guard mprotect(pages, lastPage - firstPage, PROT_READ | PROT_EXEC) == 0 else { return nil }
    // Blocks start on 16-byte boundaries.
    used = (end + 15) & ~15
    return UnsafeRawPointer(base + start)
  }

  /// The offset in the buffer of `address`, which lies in it.
  func offset(of address: UnsafeRawPointer) -> Int {
    UnsafeRawPointer(base).distance(to: address)
  }

  /// Writes each 32-bit `value` at its `offset` into installed code (a link between blocks):
  /// the pages written are made read-write, then read-execute again. False when a protection
  /// change fails (the code may then be half patched only if the second one failed).
  func patch(_ patches: [(offset: Int, value: Int32)]) -> Bool {
    let sorted = patches.sorted { $0.offset < $1.offset }
    var index = 0
    while index < sorted.count {
      // One protection change per run of patches on consecutive pages.
      let firstPage = sorted[index].offset & ~(Self.pageSize - 1)
      var end = index
      var lastPage = (sorted[index].offset + 3) & ~(Self.pageSize - 1)
      while end + 1 < sorted.count && sorted[end + 1].offset & ~(Self.pageSize - 1) <= lastPage + Self.pageSize {
        end += 1
        lastPage = max(lastPage, (sorted[end].offset + 3) & ~(Self.pageSize - 1))
      }
      let length = lastPage + Self.pageSize - firstPage
      guard mprotect(base + firstPage, length, PROT_READ | PROT_WRITE) == 0 else { return false }
      for patch in sorted[index...end] {
        (base + patch.offset).storeBytes(of: patch.value.littleEndian, as: Int32.self)
      }
      guard mprotect(base + firstPage, length, PROT_READ | PROT_EXEC) == 0 else { return false }
      index = end + 1
    }
    return true
  }

  /// Forgets every installed block (their addresses become invalid).
  func reset() {
    used = 0
    flushes += 1
  }

  /// Gives the pages back to the host (MADV_DONTNEED: they read as zeros until the next
  /// `install` writes them), after `reset`.
  func release() {
    precondition(used == 0, "the code buffer still holds translations")
    releasePages(base, byteCount: capacity)
  }
}
