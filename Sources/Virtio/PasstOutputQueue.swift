import Glibc

/// The guest's frames on their way to passt, as records of the stream (a 4-byte big-endian
/// length, then the frame), each entering the socket whole.
///
/// Debian 12's passt (2023-03) reads its socket in large chunks and does not keep a record
/// that a chunk cuts: it reads the rest of a cut record with a single blocking recv and loses
/// its place in the stream for good when that returns less, and it drops a chunk's last bytes
/// when they are no more than a length prefix. From then on it reads garbage lengths, spins,
/// and the guest's traffic stops. The socket must therefore never hold part of a record. A Unix
/// stream socket with any room takes a send that fits one of its buffers (about 36 KiB) whole
/// or, when full, not at all, so every record goes out with a send of its own (never several
/// records in one send, which the socket may cut anywhere). Only a record larger than such a
/// buffer (a jumbo frame) can be taken in part; its rest goes out with the next send.
struct PasstOutputQueue {
  private var records: [[UInt8]] = []
  /// The index of the first record not yet wholly sent.
  private var first = 0
  /// How much of the first record is already in the socket.
  private var sentOfFirst = 0
  /// Bytes waiting, the first record's sent part excluded.
  private(set) var byteCount = 0

  var isEmpty: Bool { first == records.count }

  /// Queues a record (length prefix and frame).
  mutating func append(_ record: [UInt8]) {
    records.append(record)
    byteCount += record.count
  }

  /// Sends records while the socket takes them, one send per record.
  mutating func flush(to socket: Int32) {
    while first < records.count {
      let offset = sentOfFirst
      let result = records[first].withUnsafeBytes { bytes in
        send(socket, bytes.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
      }
      if result < 0 {
        if errno == EINTR { continue }
        break  // full (EAGAIN), or passt is gone: the reader notices the end of the stream
      }
      byteCount -= result
      if offset + result < records[first].count {
        sentOfFirst = offset + result
        break
      }
      sentOfFirst = 0
      first += 1
    }
    if first == records.count {
      records.removeAll(keepingCapacity: true)
      first = 0
    } else if first >= 256 && first * 2 >= records.count {
      records.removeFirst(first)
      first = 0
    }
  }

  /// Drops every record (passt is gone).
  mutating func removeAll() {
    records.removeAll()
    first = 0
    sentOfFirst = 0
    byteCount = 0
  }
}
