import Foundation

/// JSON decoding that rejects unknown fields, as Firecracker's `deny_unknown_fields` does.
///
/// The body is decoded into the model with `JSONDecoder`; the model is then encoded again and
/// every key of the body (at any depth) must appear in that encoding. A key the model does not
/// know is therefore reported, with its dotted path, instead of being silently dropped. `null`
/// is refused everywhere: no property of either spec is nullable.
enum StrictJSON {
  /// A request body that could not be turned into the model; `description` is one line.
  struct Failure: Error, CustomStringConvertible {
    let description: String
  }

  static func decode<Model: Codable>(
    _ type: Model.Type, from body: [UInt8], unknownFieldWording: String = "unknown field"
  ) throws(Failure) -> Model {
    guard !body.isEmpty else { throw Failure(description: "the request needs a JSON body") }
    let data = Data(body)
    let raw: Any
    do {
      raw = try JSONSerialization.jsonObject(with: data, options: [])
    } catch {
      throw Failure(description: "the body is not valid JSON")
    }
    guard raw is [String: Any] else { throw Failure(description: "the body must be a JSON object") }
    let model: Model
    do {
      model = try JSONDecoder().decode(Model.self, from: data)
    } catch let error as DecodingError {
      throw Failure(description: describe(error))
    } catch let error as ModelValidationError {
      throw Failure(description: error.description)
    } catch {
      throw Failure(description: "the body does not match the expected object: \(error)")
    }
    let encoder = JSONEncoder()
    guard let reencoded = try? encoder.encode(model),
      let known = try? JSONSerialization.jsonObject(with: reencoded, options: [])
    else {
      throw Failure(description: "the body could not be checked")
    }
    if let null = firstNull(in: raw, path: "") {
      throw Failure(description: "invalid value for `\(null)`: null is not allowed")
    }
    if let unknown = firstUnknownKey(in: raw, known: known, path: "") {
      throw Failure(description: "\(unknownFieldWording) `\(unknown)`")
    }
    return model
  }

  /// The dotted path of the first `null` in `value`.
  private static func firstNull(in value: Any, path: String) -> String? {
    if let object = value as? [String: Any] {
      for key in object.keys.sorted() {
        let childPath = path.isEmpty ? key : "\(path).\(key)"
        if object[key] is NSNull { return childPath }
        if let found = firstNull(in: object[key]!, path: childPath) { return found }
      }
    } else if let array = value as? [Any] {
      for (index, element) in array.enumerated() {
        if element is NSNull { return "\(path)[\(index)]" }
        if let found = firstNull(in: element, path: "\(path)[\(index)]") { return found }
      }
    }
    return nil
  }

  /// The dotted path of the first key in `value` that `known` does not have.
  private static func firstUnknownKey(in value: Any, known: Any, path: String) -> String? {
    if let object = value as? [String: Any] {
      let knownObject = known as? [String: Any] ?? [:]
      for key in object.keys.sorted() {
        let child = object[key]!
        let childPath = path.isEmpty ? key : "\(path).\(key)"
        if child is NSNull { return nil }
        guard let knownChild = knownObject[key] else { return childPath }
        if let found = firstUnknownKey(in: child, known: knownChild, path: childPath) { return found }
      }
    } else if let array = value as? [Any], let knownArray = known as? [Any] {
      for (index, element) in array.enumerated() where index < knownArray.count {
        if let found = firstUnknownKey(in: element, known: knownArray[index], path: "\(path)[\(index)]") {
          return found
        }
      }
    }
    return nil
  }

  private static func describe(_ error: DecodingError) -> String {
    func path(_ context: DecodingError.Context) -> String {
      let components = context.codingPath.map { key in key.intValue.map { "[\($0)]" } ?? key.stringValue }
      return components.joined(separator: ".").replacingOccurrences(of: ".[", with: "[")
    }
    switch error {
    case .keyNotFound(let key, let context):
      let parent = path(context)
      return "missing field `\(parent.isEmpty ? key.stringValue : parent + "." + key.stringValue)`"
    case .typeMismatch(let type, let context):
      return "invalid type for `\(path(context))`: expected \(describe(type))"
    case .valueNotFound(let type, let context):
      return "invalid value for `\(path(context))`: expected \(describe(type)), found null"
    case .dataCorrupted(let context):
      let location = path(context)
      return location.isEmpty
        ? "the body is not valid JSON" : "invalid value for `\(location)`: \(context.debugDescription)"
    @unknown default:
      return "the body does not match the expected object"
    }
  }

  private static func describe(_ type: Any.Type) -> String {
    switch type {
    case is String.Type: return "a string"
    case is Bool.Type: return "a boolean"
    case is Int.Type, is Int64.Type, is UInt64.Type, is Int32.Type, is UInt8.Type, is Int16.Type: return "an integer"
    case is [Any].Type: return "an array"
    default: return "an object"
    }
  }

  /// Encodes `value` as compact JSON bytes.
  static func encode<Value: Encodable>(_ value: Value) -> [UInt8] {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return Array((try? encoder.encode(value)) ?? Data("{}".utf8))
  }
}

/// A value in a request body that decodes but is out of range or not allowed.
struct ModelValidationError: Error, CustomStringConvertible {
  let description: String
  init(_ description: String) { self.description = description }
}
