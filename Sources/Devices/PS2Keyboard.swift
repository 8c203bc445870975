import Synchronization

/// Scan codes of the PS/2 (AT) keyboard: X11 keysyms to scan code set 2 make codes, and the
/// 8042 controller's set 2 to set 1 translation.
public enum PS2ScanCodes {
  /// A key's scan code set 2 make code; `extended` keys send the 0xE0 prefix first.
  public struct Key: Equatable, Sendable {
    public var code: UInt8
    public var extended: Bool

    public init(_ code: UInt8, extended: Bool = false) {
      self.code = code
      self.extended = extended
    }

    /// The set 2 bytes of pressing (`down`) or releasing the key.
    public func bytes(down: Bool) -> [UInt8] {
      (extended ? [0xE0] : []) + (down ? [code] : [0xF0, code])
    }
  }

  public static let leftShift = Key(0x12)
  public static let leftControl = Key(0x14)
  public static let leftAlt = Key(0x11)

  /// Set 1 code for each set 2 code 0x00-0x7F, as the 8042 translates them (the inverse of
  /// the table of set 1 codes 0x00-0x7F to set 2).
  static let setOneFromSetTwo: [UInt8] = {
    let setTwoFromSetOne: [UInt8] = [
      0x00, 0x76, 0x16, 0x1E, 0x26, 0x25, 0x2E, 0x36, 0x3D, 0x3E, 0x46, 0x45, 0x4E, 0x55, 0x66, 0x0D,
      0x15, 0x1D, 0x24, 0x2D, 0x2C, 0x35, 0x3C, 0x43, 0x44, 0x4D, 0x54, 0x5B, 0x5A, 0x14, 0x1C, 0x1B,
      0x23, 0x2B, 0x34, 0x33, 0x3B, 0x42, 0x4B, 0x4C, 0x52, 0x0E, 0x12, 0x5D, 0x1A, 0x22, 0x21, 0x2A,
      0x32, 0x31, 0x3A, 0x41, 0x49, 0x4A, 0x59, 0x7C, 0x11, 0x29, 0x58, 0x05, 0x06, 0x04, 0x0C, 0x03,
      0x0B, 0x02, 0x0A, 0x01, 0x09, 0x77, 0x7E, 0x6C, 0x75, 0x7D, 0x7B, 0x6B, 0x73, 0x74, 0x79, 0x69,
      0x72, 0x7A, 0x70, 0x71, 0x7F, 0x60, 0x61, 0x78, 0x07, 0x0F, 0x17, 0x1F, 0x27, 0x2F, 0x37, 0x3F,
      0x47, 0x4F, 0x56, 0x5E, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40, 0x48, 0x50, 0x57, 0x6F,
      0x13, 0x19, 0x39, 0x51, 0x53, 0x5C, 0x5F, 0x62, 0x63, 0x64, 0x65, 0x67, 0x68, 0x6A, 0x6D, 0x6E,
    ]
    var table = [UInt8](repeating: 0, count: 128)
    for (setOne, setTwo) in setTwoFromSetOne.enumerated() where setOne != 0 { table[Int(setTwo)] = UInt8(setOne) }
    return table
  }()

  /// The 8042's translation of one set 2 byte (without the 0xF0 break prefix, which the
  /// controller turns into bit 7 of the next byte): 0x00-0x7F through the table, F7's 0x83 to
  /// 0x41, everything else (0xE0, 0xE1, responses) unchanged.
  public static func translateToSetOne(_ byte: UInt8) -> UInt8 {
    if byte < 0x80 { return setOneFromSetTwo[Int(byte)] }
    return byte == 0x83 ? 0x41 : byte
  }

  /// Unshifted characters on a US keyboard and their keys.
  private static let plain: [Character: UInt8] = [
    "a": 0x1C, "b": 0x32, "c": 0x21, "d": 0x23, "e": 0x24, "f": 0x2B, "g": 0x34, "h": 0x33, "i": 0x43, "j": 0x3B,
    "k": 0x42, "l": 0x4B, "m": 0x3A, "n": 0x31, "o": 0x44, "p": 0x4D, "q": 0x15, "r": 0x2D, "s": 0x1B, "t": 0x2C,
    "u": 0x3C, "v": 0x2A, "w": 0x1D, "x": 0x22, "y": 0x35, "z": 0x1A, "1": 0x16, "2": 0x1E, "3": 0x26, "4": 0x25,
    "5": 0x2E, "6": 0x36, "7": 0x3D, "8": 0x3E, "9": 0x46, "0": 0x45, "`": 0x0E, "-": 0x4E, "=": 0x55, "[": 0x54,
    "]": 0x5B, "\\": 0x5D, ";": 0x4C, "'": 0x52, ",": 0x41, ".": 0x49, "/": 0x4A, " ": 0x29,
  ]

  /// Characters typed with Shift and the unshifted character on the same key.
  private static let shifted: [Character: Character] = [
    "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9", ")": "0", "~": "`",
    "_": "-", "+": "=", "{": "[", "}": "]", "|": "\\", ":": ";", "\"": "'", "<": ",", ">": ".", "?": "/",
  ]

  /// Function and modifier keysyms (X11 keysymdef.h) and their keys.
  private static let special: [UInt32: Key] = [
    0xFF08: Key(0x66), 0xFF09: Key(0x0D), 0xFF0D: Key(0x5A), 0xFF1B: Key(0x76), 0xFFFF: Key(0x71, extended: true),
    0xFF50: Key(0x6C, extended: true), 0xFF51: Key(0x6B, extended: true), 0xFF52: Key(0x75, extended: true),
    0xFF53: Key(0x74, extended: true), 0xFF54: Key(0x72, extended: true), 0xFF55: Key(0x7D, extended: true),
    0xFF56: Key(0x7A, extended: true), 0xFF57: Key(0x69, extended: true), 0xFF63: Key(0x70, extended: true),
    0xFF8D: Key(0x5A, extended: true), 0xFF67: Key(0x2F, extended: true),
    0xFFBE: Key(0x05), 0xFFBF: Key(0x06), 0xFFC0: Key(0x04), 0xFFC1: Key(0x0C), 0xFFC2: Key(0x03), 0xFFC3: Key(0x0B),
    0xFFC4: Key(0x83), 0xFFC5: Key(0x0A), 0xFFC6: Key(0x01), 0xFFC7: Key(0x09), 0xFFC8: Key(0x78), 0xFFC9: Key(0x07),
    0xFFE1: leftShift, 0xFFE2: Key(0x59), 0xFFE3: leftControl, 0xFFE4: Key(0x14, extended: true), 0xFFE5: Key(0x58),
    0xFFE7: Key(0x1F, extended: true), 0xFFE9: leftAlt, 0xFFEA: Key(0x11, extended: true),
    0xFFEB: Key(0x1F, extended: true), 0xFFEC: Key(0x27, extended: true),
  ]

  /// The key for an X11 keysym, and whether the character needs Shift (upper-case letters and
  /// the shifted punctuation of a US layout); nil for keysyms without a key.
  public static func key(forKeysym keysym: UInt32) -> (key: Key, needsShift: Bool)? {
    if let key = special[keysym] { return (key, false) }
    guard keysym >= 0x20 && keysym < 0x7F, let scalar = Unicode.Scalar(keysym) else { return nil }
    let character = Character(scalar)
    if let code = plain[character] { return (Key(code), false) }
    if let base = shifted[character], let code = plain[base] { return (Key(code), true) }
    if character.isUppercase, let code = plain[Character(character.lowercased())] { return (Key(code), true) }
    return nil
  }

  /// The key named `name` for `sendkey` (case-insensitive): a single character, or one of
  /// ctrl, alt, shift, del/delete, ret/enter/return, tab, esc/escape, backspace/bs, space,
  /// up, down, left, right, home, end, pgup, pgdn, insert, f1-f12.
  public static func keysym(named name: String) -> UInt32? {
    let lower = name.lowercased()
    let names: [String: UInt32] = [
      "ctrl": 0xFFE3, "control": 0xFFE3, "alt": 0xFFE9, "shift": 0xFFE1, "del": 0xFFFF, "delete": 0xFFFF,
      "ret": 0xFF0D, "enter": 0xFF0D, "return": 0xFF0D, "tab": 0xFF09, "esc": 0xFF1B, "escape": 0xFF1B,
      "backspace": 0xFF08, "bs": 0xFF08, "space": 0x20, "up": 0xFF52, "down": 0xFF54, "left": 0xFF51,
      "right": 0xFF53, "home": 0xFF50, "end": 0xFF57, "pgup": 0xFF55, "pgdn": 0xFF56, "insert": 0xFF63,
    ]
    if let keysym = names[lower] { return keysym }
    if lower.hasPrefix("f"), let number = Int(lower.dropFirst()), (1...12).contains(number) {
      return 0xFFBE + UInt32(number - 1)
    }
    if name.unicodeScalars.count == 1, let scalar = name.unicodeScalars.first, scalar.value >= 0x20,
      scalar.value < 0x7F
    {
      return scalar.value
    }
    return nil
  }
}

/// Host key input for the i8042's keyboard: X11 keysym presses and releases (VNC key events,
/// `sendkey`) become scan codes. A character that needs Shift while the host holds no Shift
/// key is typed with a Shift press around it.
public final class PS2KeyboardInput: Sendable {
  private let controller: I8042Controller
  /// Shift keys the host holds down, and keysyms pressed with a Shift added for them.
  private let state = Mutex<(shiftsHeld: Set<UInt32>, addedShift: Set<UInt32>)>(([], []))

  public init(controller: I8042Controller) {
    self.controller = controller
  }

  /// A key went down or up; keysyms without a key are ignored.
  public func keysymEvent(_ keysym: UInt32, down: Bool) {
    guard let (key, needsShift) = PS2ScanCodes.key(forKeysym: keysym) else { return }
    let bytes = state.withLock { state -> [UInt8] in
      if keysym == 0xFFE1 || keysym == 0xFFE2 {
        if down { state.shiftsHeld.insert(keysym) } else { state.shiftsHeld.remove(keysym) }
        return key.bytes(down: down)
      }
      if down {
        if needsShift && state.shiftsHeld.isEmpty {
          state.addedShift.insert(keysym)
          return PS2ScanCodes.leftShift.bytes(down: true) + key.bytes(down: true)
        }
        return key.bytes(down: true)
      }
      if state.addedShift.remove(keysym) != nil {
        return key.bytes(down: false) + PS2ScanCodes.leftShift.bytes(down: false)
      }
      return key.bytes(down: false)
    }
    controller.typeScanCodes(bytes)
  }

  /// Presses `keysyms` in order, then releases them in reverse order (a chord such as
  /// Ctrl-Alt-Del).
  public func pressChord(_ keysyms: [UInt32]) {
    for keysym in keysyms { keysymEvent(keysym, down: true) }
    for keysym in keysyms.reversed() { keysymEvent(keysym, down: false) }
  }

  /// Types `text` key by key (a newline is Return); returns false, typing nothing, when a
  /// character has no key.
  @discardableResult
  public func type(_ text: String) -> Bool {
    var keysyms: [UInt32] = []
    for scalar in text.unicodeScalars {
      let keysym: UInt32 = scalar == "\n" ? 0xFF0D : scalar == "\t" ? 0xFF09 : scalar.value
      guard PS2ScanCodes.key(forKeysym: keysym) != nil else { return false }
      keysyms.append(keysym)
    }
    for keysym in keysyms { pressChord([keysym]) }
    return true
  }
}
