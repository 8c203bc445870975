import CFuzzerDriver
import Glibc

/// Runs a fuzz target under libFuzzer: `FuzzDriver.run` is the whole `main` of a target.
///
/// With `HOSTVISOR_FUZZ_SEEDS=DIR` in the environment the target writes its seed inputs into
/// `DIR` (one file each) and exits instead of fuzzing; `scripts/fuzz.sh` starts each corpus
/// from them. Counters added with `count` are printed to standard error when the process exits
/// (libFuzzer exits through `exit`, also at the end of `-max_total_time`).
public enum FuzzDriver {
  nonisolated(unsafe) private static var body: ((inout FuzzInput) -> Void)?
  nonisolated(unsafe) private static var counters: [(name: String, value: UInt64)] = []

  /// Hands `body` to libFuzzer with this process's command line; never returns.
  public static func run(name: String, seeds: () -> [[UInt8]], _ body: @escaping (inout FuzzInput) -> Void) -> Never {
    if let directory = getenv("HOSTVISOR_FUZZ_SEEDS").map({ String(cString: $0) }) {
      exit(writeSeeds(seeds(), to: directory, name: name))
    }
    Self.body = body
    atexit { FuzzDriver.printCounters() }
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    let status = LLVMFuzzerRunDriver(&argc, &argv) { data, size in
      var input = FuzzInput(UnsafeRawBufferPointer(start: data, count: size))
      FuzzDriver.body?(&input)
      return 0
    }
    exit(status)
  }

  /// A file in memory (memfd) holding `bytes` and `size` bytes long: its path under
  /// /proc/self/fd, for code that opens files by path (disks, kernels) without touching disks.
  public static func memoryFile(name: String, bytes: [UInt8] = [], size: Int) -> String {
    let fd = hv_fuzz_memfd(name)
    precondition(fd >= 0 && ftruncate(fd, off_t(size)) == 0, "cannot create a memfd")
    let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
    precondition(written == bytes.count, "cannot fill a memfd")
    return "/proc/self/fd/\(fd)"
  }

  /// Adds `amount` to the counter `name` (reported at exit).
  public static func count(_ name: String, _ amount: UInt64 = 1) {
    if let index = counters.firstIndex(where: { $0.name == name }) {
      counters[index].value &+= amount
    } else {
      counters.append((name, amount))
    }
  }

  private static func printCounters() {
    guard !counters.isEmpty else { return }
    let line = "hostvisor-fuzz: " + counters.map { "\($0.name) \($0.value)" }.joined(separator: ", ") + "\n"
    _ = line.withCString { write(STDOUT_FILENO, $0, strlen($0)) }
  }

  private static func writeSeeds(_ seeds: [[UInt8]], to directory: String, name: String) -> Int32 {
    mkdir(directory, 0o755)
    for (index, seed) in seeds.enumerated() {
      let path = "\(directory)/\(name)-seed-\(index)"
      let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
      guard fd >= 0 else {
        let line = "hostvisor-fuzz: cannot write \(path): \(String(cString: strerror(errno)))\n"
        _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
        return 1
      }
      let written = seed.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
      close(fd)
      guard written == seed.count else { return 1 }
    }
    return 0
  }
}

/// The fuzzer's bytes, read front to back as the values a target needs; reading past the end
/// gives zeros, so every input is a complete test case.
public struct FuzzInput {
  private let bytes: UnsafeRawBufferPointer
  private var position = 0

  public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

  /// Bytes not read yet.
  public var remaining: Int { bytes.count - position }
  /// Whether every byte has been read.
  public var isEmpty: Bool { remaining == 0 }

  /// The next byte, or 0 at the end.
  public mutating func byte() -> UInt8 {
    guard position < bytes.count else { return 0 }
    defer { position += 1 }
    return bytes[position]
  }

  /// The next `T`, little-endian, from as many bytes as are left.
  public mutating func integer<T: FixedWidthInteger & UnsignedInteger>(_: T.Type = T.self) -> T {
    var value: T = 0
    for index in 0..<(T.bitWidth / 8) { value |= T(byte()) << (8 * index) }
    return value
  }

  /// A value below `bound` (0 when `bound` is 0).
  public mutating func below(_ bound: Int) -> Int { bound <= 0 ? 0 : Int(integer(UInt32.self) % UInt32(bound)) }

  /// Whether the next byte is odd.
  public mutating func flag() -> Bool { byte() & 1 != 0 }

  /// The next `count` bytes (fewer at the end).
  public mutating func bytes(_ count: Int) -> [UInt8] {
    let taken = max(0, min(count, remaining))
    defer { position += taken }
    return Array(bytes[position..<(position + taken)])
  }

  /// Everything left.
  public mutating func rest() -> [UInt8] { bytes(remaining) }
}
