import Glibc

extension GuestMemory {
  /// Size of the pages the memory file is written in; all-zero pages stay holes.
  public static let snapshotPageSize = 4096

  /// Writes guest RAM to `descriptor` (an empty, writable regular file) in the memory-file
  /// layout: the regions back to back from offset 0, all-zero pages left as holes, the file
  /// extended to `totalSize`. Returns the number of bytes actually written (non-zero pages).
  /// The caller fsyncs the file.
  public func writeSparse(to descriptor: Int32) throws(MachineStateError) -> UInt64 {
    guard ftruncate(descriptor, off_t(totalSize)) == 0 else {
      throw MachineStateError("cannot size the memory file: \(String(cString: strerror(errno)))")
    }
    var written: UInt64 = 0
    var fileOffset: UInt64 = 0
    let page = Self.snapshotPageSize
    for region in regions {
      let pages = Int(region.size) / page
      var index = 0
      while index < pages {
        // Find the next run of pages that hold data.
        while index < pages && Self.isZeroPage(region.host + index * page) { index += 1 }
        let runStart = index
        while index < pages && !Self.isZeroPage(region.host + index * page) { index += 1 }
        guard index > runStart else { continue }
        var done = 0
        let runBytes = (index - runStart) * page
        while done < runBytes {
          let result = pwrite(
            descriptor, region.host + runStart * page + done, runBytes - done,
            off_t(fileOffset) + off_t(runStart * page + done))
          if result < 0 && errno == EINTR { continue }
          guard result > 0 else {
            throw MachineStateError("cannot write the memory file: \(String(cString: strerror(errno)))")
          }
          done += result
        }
        written += UInt64(runBytes)
      }
      fileOffset += region.size
    }
    return written
  }

  /// Whether the 4 KiB page at `pointer` is all zeros.
  @inline(__always)
  static func isZeroPage(_ pointer: UnsafeMutableRawPointer) -> Bool {
    let words = pointer.assumingMemoryBound(to: UInt64.self)
    var accumulated: UInt64 = 0
    for index in 0..<(snapshotPageSize / 8) {
      accumulated |= words[index]
      if index & 63 == 63 && accumulated != 0 { return false }
    }
    return accumulated == 0
  }

  /// Opens a snapshot's memory file for reading; it must be a regular file of exactly `size`
  /// bytes. The caller closes the descriptor.
  static func openSnapshotFile(_ path: String, size: UInt64) throws(MachineStateError) -> Int32 {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else {
      throw MachineStateError("cannot open memory file '\(path)': \(String(cString: strerror(errno)))")
    }
    var info = stat()
    guard fstat(descriptor, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
      close(descriptor)
      throw MachineStateError("memory file '\(path)' is not a regular file")
    }
    guard UInt64(info.st_size) == size else {
      close(descriptor)
      throw MachineStateError(
        "memory file '\(path)' holds \(info.st_size) bytes but the snapshot's machine has \(size) bytes of RAM")
    }
    return descriptor
  }

  /// Maps a snapshot's memory file at `path` copy-on-write as guest RAM of `size` bytes. The
  /// pages are read from the file on first touch, so the time this takes does not grow with
  /// the RAM size; several machines mapping one file share its unmodified pages.
  public static func mapping(snapshotFile path: String, size: UInt64) throws(MachineStateError) -> GuestMemory {
    let descriptor = try openSnapshotFile(path, size: size)
    defer { close(descriptor) }
    do {
      return try GuestMemory(size: size, mappingFile: descriptor)
    } catch {
      throw MachineStateError("cannot map memory file '\(path)': \(error)")
    }
  }
}
