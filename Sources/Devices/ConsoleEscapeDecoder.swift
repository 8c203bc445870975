/// Decodes QEMU-style console escapes in host keyboard input: Ctrl-A is the escape key.
///
/// - Ctrl-A x (or X): quit.
/// - Ctrl-A Ctrl-A: a literal Ctrl-A for the guest.
/// - Ctrl-A h (or ?): show the escape help.
/// - Ctrl-A followed by anything else: both bytes are dropped, as QEMU does.
///
/// The state carries across calls, so an escape split over two reads still works.
public struct ConsoleEscapeDecoder: Sendable {
  /// The escape key, Ctrl-A.
  public static let escapeByte: UInt8 = 0x01

  /// One result of decoding, in input order.
  public enum Action: Equatable, Sendable {
    /// Bytes for the guest.
    case forward([UInt8])
    /// The user asked to quit (Ctrl-A x).
    case quit
    /// The user asked for help (Ctrl-A h).
    case help
  }

  /// The help text for the escapes.
  public static let helpText = """
    C-a h    print this help
    C-a x    exit the virtual machine
    C-a C-a  send C-a to the guest

    """

  private var escapePending = false

  public init() {}

  /// Decodes `bytes`, returning guest data and commands in the order they were typed.
  public mutating func decode(_ bytes: some Sequence<UInt8>) -> [Action] {
    var actions: [Action] = []
    var data: [UInt8] = []
    func flush() {
      if !data.isEmpty {
        actions.append(.forward(data))
        data.removeAll()
      }
    }
    for byte in bytes {
      if escapePending {
        escapePending = false
        switch byte {
        case Self.escapeByte:
          data.append(byte)
        case UInt8(ascii: "x"), UInt8(ascii: "X"):
          flush()
          actions.append(.quit)
        case UInt8(ascii: "h"), UInt8(ascii: "H"), UInt8(ascii: "?"):
          flush()
          actions.append(.help)
        default:
          break
        }
      } else if byte == Self.escapeByte {
        escapePending = true
      } else {
        data.append(byte)
      }
    }
    flush()
    return actions
  }
}
