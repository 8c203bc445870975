import Synchronization
import VMCore

/// A driver error found in a virtqueue: the device stops using the queue, sets
/// DEVICE_NEEDS_RESET and tells the driver through a configuration-change interrupt.
public struct VirtqueueError: Error, Equatable, Sendable, CustomStringConvertible {
  /// What the driver did wrong.
  public let message: String
  public init(_ message: String) { self.message = message }
  public var description: String { message }
}

/// One buffer of a descriptor chain: guest-physical address, length, and whether the device
/// writes it. Every segment of a popped chain lies entirely inside guest RAM.
public struct VirtqBuffer: Sendable, Equatable {
  public var address: UInt64
  public var length: UInt32
  public var isWritable: Bool
}

/// A descriptor chain popped from the available ring: its head index and its buffers, the
/// device-readable ones first (the walker rejects a readable buffer after a writable one).
///
/// Reused from request to request so the steady state allocates nothing.
public struct DescriptorChain: Sendable {
  /// Index of the chain's first descriptor (what the used ring reports back).
  public var head: UInt16 = 0
  /// All buffers, readable ones first.
  public var buffers: [VirtqBuffer] = []
  /// Number of leading device-readable buffers.
  public var readableCount = 0
  /// Total bytes of the device-readable buffers.
  public var readableLength: UInt64 = 0
  /// Total bytes of the device-writable buffers.
  public var writableLength: UInt64 = 0

  public init() { buffers.reserveCapacity(64) }

  mutating func start(head: UInt16) {
    self.head = head
    buffers.removeAll(keepingCapacity: true)
    readableCount = 0
    readableLength = 0
    writableLength = 0
  }

  /// The device-readable buffers.
  public var readable: ArraySlice<VirtqBuffer> { buffers[0..<readableCount] }
  /// The device-writable buffers.
  public var writable: ArraySlice<VirtqBuffer> { buffers[readableCount...] }

  /// Copies readable bytes starting at logical offset `offset` of the readable area into
  /// `destination`; returns how many bytes were copied.
  public func read(
    from memory: GuestMemory, offset: UInt64, into destination: UnsafeMutableRawBufferPointer
  ) -> Int {
    readSpans(memory: memory, offset: offset, count: destination.count) { pointer, done, count in
      destination.baseAddress!.advanced(by: done).copyMemory(from: pointer, byteCount: count)
    }
  }

  /// Copies `source` into the writable area starting at logical offset `offset`; returns how
  /// many bytes fit.
  public func write(to memory: GuestMemory, offset: UInt64, from source: UnsafeRawBufferPointer) -> Int {
    fillSpans(memory: memory, offset: offset, count: source.count) { pointer, done, count in
      pointer.copyMemory(from: source.baseAddress!.advanced(by: done), byteCount: count)
    }
  }

  /// Calls `body(pointer, done, count)` with read-only host pointers covering `count` bytes of
  /// the device-readable area from logical `offset` (`done` = bytes covered before this span);
  /// returns how many bytes were covered.
  public func readSpans(
    memory: GuestMemory, offset: UInt64, count: Int, _ body: (UnsafeRawPointer, Int, Int) -> Void
  ) -> Int {
    spans(memory: memory, buffers: readable, offset: offset, count: count) { pointer, done, length in
      body(UnsafeRawPointer(pointer), done, length)
    }
  }

  /// Calls `body(pointer, done, count)` with host pointers covering `count` bytes of the
  /// device-writable area from logical `offset`, for the device to fill; returns how many bytes
  /// were covered. Each span is reported to `memory`'s write observer after `body` returns
  /// (device DMA: the software CPU drops decoded code from those pages). This and `write` are
  /// the only ways a device writes a guest buffer.
  public func fillSpans(
    memory: GuestMemory, offset: UInt64, count: Int, _ body: (UnsafeMutableRawPointer, Int, Int) -> Void
  ) -> Int {
    spans(memory: memory, buffers: writable, offset: offset, count: count) { pointer, done, length in
      body(pointer, done, length)
    } written: { address, length in
      memory.noteWrite(at: address, length: UInt64(length))
    }
  }

  /// Calls `body` once with read-only host buffers covering `count` bytes of the
  /// device-readable area from logical `offset`, in order (for one vectored write to a
  /// backend); returns how many bytes they cover.
  public func readVectored<Failure: Error>(
    memory: GuestMemory, offset: UInt64, count: Int, _ body: ([UnsafeRawBufferPointer]) throws(Failure) -> Void
  ) throws(Failure) -> Int {
    var spans: [UnsafeRawBufferPointer] = []
    let covered = self.spans(memory: memory, buffers: readable, offset: offset, count: count) { pointer, _, length in
      spans.append(UnsafeRawBufferPointer(start: pointer, count: length))
    }
    try body(spans)
    return covered
  }

  /// Calls `body` once with host buffers covering `count` bytes of the device-writable area
  /// from logical `offset`, in order, for the device to fill (one vectored read from a
  /// backend); returns how many bytes they cover. Every span is reported to `memory`'s write
  /// observer after `body` returns or throws, as `fillSpans` does.
  public func fillVectored<Failure: Error>(
    memory: GuestMemory, offset: UInt64, count: Int, _ body: ([UnsafeMutableRawBufferPointer]) throws(Failure) -> Void
  ) throws(Failure) -> Int {
    var spans: [UnsafeMutableRawBufferPointer] = []
    var addresses: [(address: UInt64, length: Int)] = []
    let covered = self.spans(memory: memory, buffers: writable, offset: offset, count: count) { pointer, _, length in
      spans.append(UnsafeMutableRawBufferPointer(start: pointer, count: length))
    } written: { address, length in
      addresses.append((address, length))
    }
    defer {
      for span in addresses { memory.noteWrite(at: span.address, length: UInt64(span.length)) }
    }
    try body(spans)
    return covered
  }

  /// Walks `count` bytes of `buffers` from logical `offset`, giving `body` host pointers from
  /// GuestMemory's bounds-checked slices and then `written` the guest address of each span.
  private func spans(
    memory: GuestMemory, buffers: ArraySlice<VirtqBuffer>, offset: UInt64, count: Int,
    _ body: (UnsafeMutableRawPointer, Int, Int) -> Void, written: (UInt64, Int) -> Void = { _, _ in }
  ) -> Int {
    guard count > 0 else { return 0 }
    var skip = offset
    var done = 0
    for buffer in buffers {
      let length = UInt64(buffer.length)
      if skip >= length {
        skip -= length
        continue
      }
      let chunk = Int(min(length - skip, UInt64(count - done)))
      let address = buffer.address + skip
      guard let slice = try? memory.slice(at: address, length: UInt64(chunk)), chunk > 0 else {
        return done
      }
      body(slice.baseAddress!, done, chunk)
      written(address, chunk)
      done += chunk
      skip = 0
      if done == count { break }
    }
    return done
  }
}

/// One split virtqueue (virtio 1.2, 2.7) as the device sees it: the driver-programmed layout,
/// the device's position in the available ring, and the used ring it fills.
///
/// Kept apart from devices and transports. Every guest access goes through GuestMemory's
/// bounds-checked API; every driver mistake becomes a `VirtqueueError`.
public struct SplitVirtqueue: Sendable {
  /// The largest size the device supports (a power of two).
  public let maxSize: UInt16
  /// Queue size the driver chose.
  public var size: UInt16
  /// Guest-physical address of the descriptor table.
  public var descriptorTable: UInt64 = 0
  /// Guest-physical address of the available ring (driver area).
  public var availableRing: UInt64 = 0
  /// Guest-physical address of the used ring (device area).
  public var usedRing: UInt64 = 0
  /// Whether the driver enabled the queue.
  public var isEnabled = false
  /// The MSI-X vector of the queue, or `virtioNoVector`.
  public var msixVector: UInt16 = virtioNoVector
  /// Whether VIRTIO_F_EVENT_IDX was negotiated.
  public var eventIndex = false
  /// Whether VIRTIO_F_INDIRECT_DESC was negotiated.
  public var indirectDescriptors = false
  /// Next available-ring entry the device will read.
  public private(set) var lastAvailableIndex: UInt16 = 0
  /// The device's used index.
  public private(set) var usedIndex: UInt16 = 0
  private var signalledUsedIndex: UInt16 = 0
  private var usedSinceSignal = false
  private let memory: GuestMemory

  public init(memory: GuestMemory, maxSize: UInt16) {
    precondition(maxSize.nonzeroBitCount == 1)
    self.memory = memory
    self.maxSize = maxSize
    self.size = maxSize
  }

  /// Back to the state after device reset (size = max, nothing enabled).
  public mutating func reset() {
    size = maxSize
    descriptorTable = 0
    availableRing = 0
    usedRing = 0
    isEnabled = false
    msixVector = virtioNoVector
    eventIndex = false
    indirectDescriptors = false
    lastAvailableIndex = 0
    usedIndex = 0
    signalledUsedIndex = 0
    usedSinceSignal = false
  }

  /// Checks the driver's layout when it enables the queue: the size is a power of two no
  /// larger than `maxSize`, the rings are aligned and lie entirely in guest RAM.
  public func validate() throws(VirtqueueError) {
    guard size != 0, size.nonzeroBitCount == 1 else { throw VirtqueueError("queue size \(size) is not a power of two") }
    guard size <= maxSize else { throw VirtqueueError("queue size \(size) exceeds the maximum \(maxSize)") }
    let count = UInt64(size)
    guard descriptorTable % 16 == 0, availableRing % 2 == 0, usedRing % 4 == 0 else {
      throw VirtqueueError("misaligned ring addresses")
    }
    guard memory.hostPointer(descriptorTable, length: 16 * count) != nil,
      memory.hostPointer(availableRing, length: 6 + 2 * count) != nil,
      memory.hostPointer(usedRing, length: 6 + 8 * count) != nil
    else { throw VirtqueueError("ring outside guest RAM") }
  }

  private func load16(_ address: UInt64) throws(VirtqueueError) -> UInt16 {
    do { return try memory.read(UInt16.self, at: address) } catch { throw VirtqueueError("\(error)") }
  }

  private func store16(_ value: UInt16, _ address: UInt64) throws(VirtqueueError) {
    do { try memory.write(value, at: address) } catch { throw VirtqueueError("\(error)") }
  }

  private func store32(_ value: UInt32, _ address: UInt64) throws(VirtqueueError) {
    do { try memory.write(value, at: address) } catch { throw VirtqueueError("\(error)") }
  }

  /// The driver's available index.
  public func availableIndex() throws(VirtqueueError) -> UInt16 { try load16(availableRing + 2) }

  /// Whether the driver has made buffers available that the device has not taken yet.
  public func hasAvailable() throws(VirtqueueError) -> Bool {
    let pending = try availableIndex() &- lastAvailableIndex
    guard pending <= size else {
      throw VirtqueueError("available index moved \(pending) entries ahead of a \(size)-entry queue")
    }
    return pending != 0
  }

  /// Pops the next available chain into `chain`. Returns false when the ring is empty (then,
  /// with event index, avail_event is updated so the driver notifies on its next buffer).
  public mutating func popAvailable(into chain: inout DescriptorChain) throws(VirtqueueError) -> Bool {
    if try !hasAvailable() {
      if eventIndex {
        try store16(lastAvailableIndex, usedRing + 4 + 8 * UInt64(size))
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if try !hasAvailable() { return false }
      } else {
        return false
      }
    }
    // Read the ring entry only after seeing the index that covers it.
    atomicMemoryFence(ordering: .acquiring)
    let head = try load16(availableRing + 4 + 2 * UInt64(lastAvailableIndex % size))
    try walk(head: head, into: &chain)
    lastAvailableIndex &+= 1
    if eventIndex { try store16(lastAvailableIndex, usedRing + 4 + 8 * UInt64(size)) }
    return true
  }

  /// Gives back the last `count` popped chains (not yet used), e.g. when a received frame does
  /// not fit the buffers available so far.
  public mutating func undoPop(_ count: Int) {
    lastAvailableIndex &-= UInt16(truncatingIfNeeded: count)
  }

  /// Walks the chain at `head`, following NEXT links and one level of indirection, rejecting
  /// loops, chains longer than the queue, nested indirect tables, buffers outside RAM, and
  /// readable buffers after writable ones.
  private func walk(head: UInt16, into chain: inout DescriptorChain) throws(VirtqueueError) {
    chain.start(head: head)
    var table = descriptorTable
    var tableEntries = UInt32(size)
    var index = UInt32(head)
    var inIndirect = false
    var visited = 0
    var readable = true
    while true {
      guard index < tableEntries else {
        throw VirtqueueError("descriptor index \(index) outside a \(tableEntries)-entry table")
      }
      visited += 1
      guard visited <= Int(size) + 1 else { throw VirtqueueError("descriptor chain longer than the queue (loop?)") }
      let entry: UnsafeMutableRawBufferPointer
      do { entry = try memory.slice(at: table + 16 * UInt64(index), length: 16) } catch {
        throw VirtqueueError("descriptor table outside guest RAM")
      }
      let address = UInt64(littleEndian: entry.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
      let length = UInt32(littleEndian: entry.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
      let flags = UInt16(littleEndian: entry.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
      let next = UInt16(littleEndian: entry.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
      if flags & VirtqDescriptorFlag.indirect != 0 {
        guard indirectDescriptors else { throw VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC") }
        guard !inIndirect else { throw VirtqueueError("nested indirect descriptor table") }
        guard flags & VirtqDescriptorFlag.next == 0 else { throw VirtqueueError("indirect descriptor with NEXT set") }
        guard length >= 16, length % 16 == 0 else {
          throw VirtqueueError("indirect table length \(length) is not a multiple of 16")
        }
        guard memory.hostPointer(address, length: UInt64(length)) != nil else {
          throw VirtqueueError("indirect table outside guest RAM")
        }
        table = address
        tableEntries = length / 16
        index = 0
        inIndirect = true
        continue
      }
      guard chain.buffers.count < Int(size) else { throw VirtqueueError("descriptor chain longer than the queue") }
      guard memory.hostPointer(address, length: max(UInt64(length), 1)) != nil else {
        throw VirtqueueError("buffer 0x\(String(address, radix: 16))+0x\(String(length, radix: 16)) outside guest RAM")
      }
      let writable = flags & VirtqDescriptorFlag.write != 0
      if writable {
        readable = false
        chain.writableLength += UInt64(length)
      } else {
        guard readable else { throw VirtqueueError("device-readable buffer after a device-writable one") }
        chain.readableCount += 1
        chain.readableLength += UInt64(length)
      }
      chain.buffers.append(VirtqBuffer(address: address, length: length, isWritable: writable))
      guard flags & VirtqDescriptorFlag.next != 0 else { return }
      index = UInt32(next)
    }
  }

  /// Returns chain `head` to the driver with `length` bytes written.
  public mutating func pushUsed(head: UInt16, length: UInt32) throws(VirtqueueError) {
    let slot = usedRing + 4 + 8 * UInt64(usedIndex % size)
    try store32(UInt32(head), slot)
    try store32(length, slot + 4)
    // The element must be visible before the index that publishes it.
    atomicMemoryFence(ordering: .releasing)
    usedIndex &+= 1
    try store16(usedIndex, usedRing + 2)
    usedSinceSignal = true
  }

  /// Whether the driver wants an interrupt for the used buffers added since the last call
  /// (VIRTQ_AVAIL_F_NO_INTERRUPT, or used_event with VIRTIO_F_EVENT_IDX).
  public mutating func takeInterruptDecision() throws(VirtqueueError) -> Bool {
    guard usedSinceSignal else { return false }
    usedSinceSignal = false
    // The used index store must be visible before reading the driver's suppression state.
    atomicMemoryFence(ordering: .sequentiallyConsistent)
    if eventIndex {
      let usedEvent = try load16(availableRing + 4 + 2 * UInt64(size))
      let old = signalledUsedIndex
      signalledUsedIndex = usedIndex
      return (usedIndex &- usedEvent &- 1) < (usedIndex &- old)
    }
    return try load16(availableRing) & 1 == 0
  }
}

// MARK: Machine state

/// A queue's layout, enable bit, vector, negotiated ring features and the device's indices
/// (last available entry read, used index, the used index last signalled).
extension SplitVirtqueue {
  func saveState(into writer: inout StateWriter) {
    writer.write(maxSize)
    writer.write(size)
    writer.write(descriptorTable)
    writer.write(availableRing)
    writer.write(usedRing)
    writer.write(isEnabled)
    writer.write(msixVector)
    writer.write(eventIndex)
    writer.write(indirectDescriptors)
    writer.write(lastAvailableIndex)
    writer.write(usedIndex)
    writer.write(signalledUsedIndex)
    writer.write(usedSinceSignal)
  }

  mutating func restoreState(from reader: inout StateReader) throws(MachineStateError) {
    let savedMaximum: UInt16 = try reader.read()
    guard savedMaximum == maxSize else {
      throw MachineStateError("the state file does not match this machine: a virtqueue's maximum size differs")
    }
    size = try reader.read()
    descriptorTable = try reader.read()
    availableRing = try reader.read()
    usedRing = try reader.read()
    isEnabled = try reader.readBool()
    msixVector = try reader.read()
    eventIndex = try reader.readBool()
    indirectDescriptors = try reader.readBool()
    lastAvailableIndex = try reader.read()
    usedIndex = try reader.read()
    signalledUsedIndex = try reader.read()
    usedSinceSignal = try reader.readBool()
    if isEnabled {
      do {
        try validate()
      } catch {
        throw .invalid("virtqueue (\(error.message))")
      }
    }
  }
}
