import Glibc
import VMCore

/// lseek whence values of Linux (<linux/fs.h>), which Glibc's Swift overlay does not export.
private let seekData: Int32 = 3
private let seekHole: Int32 = 4

// Diff snapshots (Firecracker's `snapshot_type: "Diff"`): the memory file of a diff snapshot
// has the size of guest RAM and the memory-file layout, but holds only the pages written since
// the previous snapshot; every other page is a hole. A diff is laid over its base (the previous
// full snapshot's memory file, or a base with earlier diffs merged into it): on restore
// (`memory=BASE,diff=PATH...`) or once for good with `hostvisor merge-memory BASE DIFF...`.
// Pages that are dirty are written even when they are all zero, so a hole always means
// "unchanged"; the file system must keep written zero blocks as data and report holes with
// SEEK_HOLE at 4 KiB granularity (tmpfs, ext4, XFS, btrfs do), which the writer checks.

extension GuestMemory {
  /// The memory-file offset of guest-physical page `page`, nil outside RAM.
  func fileOffset(ofPage page: UInt64) -> UInt64? {
    var offset: UInt64 = 0
    let address = page << 12
    for region in regions {
      if address >= region.guestBase && address < region.guestEnd { return offset + (address - region.guestBase) }
      offset += region.size
    }
    return nil
  }

  /// The host address of memory-file offset `offset` and the bytes left in its region.
  func hostAddress(ofFileOffset offset: UInt64) -> (UnsafeMutableRawPointer, UInt64)? {
    var start: UInt64 = 0
    for region in regions {
      if offset >= start && offset < start + region.size {
        return (region.host + Int(offset - start), region.size - (offset - start))
      }
      start += region.size
    }
    return nil
  }

  /// Writes the guest-physical pages `pages` (ascending) to `descriptor`, an empty writable
  /// file, in the memory-file layout; the file is sized to the RAM size and every other page
  /// stays a hole. Checks that the file system kept exactly those pages as data.
  func writeDiff(pages: [UInt64], to descriptor: Int32) throws(MachineStateError) {
    guard ftruncate(descriptor, off_t(totalSize)) == 0 else {
      throw MachineStateError("cannot size the memory file: \(String(cString: strerror(errno)))")
    }
    var index = 0
    while index < pages.count {
      // A run of consecutive pages in one region is one write.
      var end = index + 1
      while end < pages.count && pages[end] == pages[end - 1] + 1
        && hostPointer(pages[index] << 12, length: UInt64(end + 1 - index) << 12) != nil
      {
        end += 1
      }
      guard let offset = fileOffset(ofPage: pages[index]),
        let host = hostPointer(pages[index] << 12, length: UInt64(end - index) << 12)
      else {
        throw MachineStateError("dirty page 0x\(String(pages[index], radix: 16)) is outside guest RAM")
      }
      try Self.writeAll(descriptor, host, count: (end - index) << 12, at: offset)
      index = end
    }
    let dataBytes = try Self.dataExtents(descriptor, size: totalSize).reduce(0) { $0 + $1.length }
    guard dataBytes == UInt64(pages.count) << 12 else {
      throw MachineStateError(
        "the memory file's file system cannot hold a diff snapshot (it reports \(dataBytes) bytes of data for "
          + "\(pages.count) written pages; use tmpfs, ext4, XFS or btrfs)")
    }
  }

  /// Lays the diff memory file at `path` over this memory: every data extent of the file is
  /// copied in; holes leave the memory as it is.
  public func applyDiff(path: String) throws(MachineStateError) {
    let descriptor = try Self.openMemoryFile(path, size: totalSize, flags: O_RDONLY)
    defer { close(descriptor) }
    for extent in try Self.dataExtents(descriptor, size: totalSize) {
      var done: UInt64 = 0
      while done < extent.length {
        guard let (host, available) = hostAddress(ofFileOffset: extent.offset + done) else { break }
        let count = min(available, extent.length - done)
        try Self.readAll(descriptor, host, count: Int(count), at: extent.offset + done, path: path)
        done += count
      }
    }
  }

  /// Lays each diff memory file of `diffPaths` (in order) over the memory file `basePath`,
  /// in place: the base then holds the memory of the newest diff's snapshot.
  public static func mergeDiffs(into basePath: String, diffPaths: [String]) throws(MachineStateError) {
    var info = stat()
    guard stat(basePath, &info) == 0 else {
      throw MachineStateError("cannot open memory file '\(basePath)': \(String(cString: strerror(errno)))")
    }
    let size = UInt64(info.st_size)
    let base = try openMemoryFile(basePath, size: size, flags: O_RDWR)
    defer { close(base) }
    let bufferSize = 1 << 20
    let pointer = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 4096)
    defer { pointer.deallocate() }
    for path in diffPaths {
      let diff = try openMemoryFile(path, size: size, flags: O_RDONLY)
      defer { close(diff) }
      for extent in try dataExtents(diff, size: size) {
        var done: UInt64 = 0
        while done < extent.length {
          let count = Int(min(UInt64(bufferSize), extent.length - done))
          try readAll(diff, pointer, count: count, at: extent.offset + done, path: path)
          try writeAll(base, pointer, count: count, at: extent.offset + done)
          done += UInt64(count)
        }
      }
    }
    guard fsync(base) == 0 else {
      throw MachineStateError("cannot write memory file '\(basePath)': \(String(cString: strerror(errno)))")
    }
  }

  /// Opens a memory file and checks that it is a regular file of `size` bytes.
  static func openMemoryFile(_ path: String, size: UInt64, flags: Int32) throws(MachineStateError) -> Int32 {
    let descriptor = open(path, flags | O_CLOEXEC)
    guard descriptor >= 0 else {
      throw MachineStateError("cannot open memory file '\(path)': \(String(cString: strerror(errno)))")
    }
    var info = stat()
    guard fstat(descriptor, &info) == 0, info.st_mode & S_IFMT == S_IFREG, UInt64(info.st_size) == size else {
      close(descriptor)
      throw MachineStateError("memory file '\(path)' is not a regular file of \(size) bytes (the machine's RAM size)")
    }
    return descriptor
  }

  /// The data extents (offset, length) of the file, from SEEK_DATA and SEEK_HOLE.
  static func dataExtents(_ descriptor: Int32, size: UInt64) throws(MachineStateError) -> [(
    offset: UInt64, length: UInt64
  )] {
    var extents: [(offset: UInt64, length: UInt64)] = []
    var position: off_t = 0
    while UInt64(position) < size {
      let data = lseek(descriptor, position, seekData)
      if data < 0 {
        if errno == ENXIO { break }
        throw MachineStateError("cannot find the data in a memory file: \(String(cString: strerror(errno)))")
      }
      let hole = lseek(descriptor, data, seekHole)
      guard hole > data else { break }
      extents.append((UInt64(data), UInt64(hole - data)))
      position = hole
    }
    return extents
  }

  static func writeAll(_ descriptor: Int32, _ source: UnsafeRawPointer, count: Int, at offset: UInt64)
    throws(MachineStateError)
  {
    var done = 0
    while done < count {
      let result = pwrite(descriptor, source + done, count - done, off_t(offset) + off_t(done))
      if result < 0 && errno == EINTR { continue }
      guard result > 0 else {
        throw MachineStateError("cannot write the memory file: \(String(cString: strerror(errno)))")
      }
      done += result
    }
  }

  static func readAll(
    _ descriptor: Int32, _ destination: UnsafeMutableRawPointer, count: Int, at offset: UInt64, path: String
  ) throws(MachineStateError) {
    var done = 0
    while done < count {
      let result = pread(descriptor, destination + done, count - done, off_t(offset) + off_t(done))
      if result < 0 && errno == EINTR { continue }
      guard result > 0 else {
        throw MachineStateError("cannot read memory file '\(path)': \(String(cString: strerror(errno)))")
      }
      done += result
    }
  }
}
