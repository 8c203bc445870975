import Glibc

/// lseek(2) whences from <unistd.h> that Glibc only declares under _GNU_SOURCE (Linux values).
private let seekData: Int32 = 3
private let seekHole: Int32 = 4

extension GuestMemory {
  /// Reads a snapshot's memory file at `path` into fresh anonymous guest RAM of `size` bytes
  /// (the eager restore mode): every page with data is read before the machine runs, so the
  /// guest never waits for the page cache and the RAM no longer depends on the file. Holes
  /// (never-written pages) are skipped with SEEK_DATA/SEEK_HOLE and stay untouched zero pages.
  /// Takes time proportional to the data in the file, unlike `mapping(snapshotFile:size:)`.
  public static func loading(snapshotFile path: String, size: UInt64) throws(MachineStateError) -> GuestMemory {
    let descriptor = try openSnapshotFile(path, size: size)
    defer { close(descriptor) }
    let memory: GuestMemory
    do {
      memory = try GuestMemory(size: size)
    } catch {
      throw MachineStateError("cannot allocate guest RAM for the snapshot: \(error)")
    }
    try memory.readSnapshotData(from: descriptor, path: path)
    return memory
  }

  /// Reads the data runs of the memory file open at `descriptor` (already checked to be a
  /// regular file of this memory's size) into this memory; holes leave it as it is. `path`
  /// names the file in errors. The eager restore's reader (`loading(snapshotFile:size:)`);
  /// the snapshot-memory fuzz target calls it on guarded RAM.
  func readSnapshotData(from descriptor: Int32, path: String) throws(MachineStateError) {
    var regionStart: UInt64 = 0
    for region in regions {
      let regionEnd = regionStart + region.size
      var offset = regionStart
      while offset < regionEnd {
        // The next run of data in this region (a file system without SEEK_DATA reads everything).
        var dataStart = lseek(descriptor, off_t(offset), seekData)
        if dataStart < 0 {
          if errno == ENXIO { break }
          dataStart = off_t(offset)
        }
        guard UInt64(dataStart) < regionEnd else { break }
        var dataEnd = lseek(descriptor, dataStart, seekHole)
        if dataEnd < 0 || UInt64(dataEnd) > regionEnd { dataEnd = off_t(regionEnd) }
        var position = UInt64(dataStart)
        while position < UInt64(dataEnd) {
          let count = pread(
            descriptor, region.host + Int(position - regionStart), Int(UInt64(dataEnd) - position), off_t(position))
          if count < 0 && errno == EINTR { continue }
          guard count > 0 else {
            let reason = count == 0 ? "unexpected end of file" : String(cString: strerror(errno))
            throw MachineStateError("cannot read memory file '\(path)': \(reason)")
          }
          position += UInt64(count)
        }
        offset = position
      }
      regionStart = regionEnd
    }
  }
}
