import Foundation

/// How the runtime turns states and messages into history bytes and back.
///
/// The default, ``BinaryEntityCodec``, is a compact keyed binary format, tolerant of added optional
/// fields and unknown keys, and reads JSON too; ``JSONEntityCodec`` writes readable JSON. A codec must decode everything it encoded, in any later version of the
/// code that keeps the types compatible.
public protocol EntityCodec: Sendable {
    func encode<Value: Encodable>(_ value: Value) throws -> [UInt8]
    func decode<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) throws -> Value
}

/// JSON through Foundation, with sorted keys so equal values give equal bytes.
public struct JSONEntityCodec: EntityCodec {
    public init() {}

    public func encode<Value: Encodable>(_ value: Value) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try encoder.encode(value))
    }

    public func decode<Value: Decodable>(_ type: Value.Type, from bytes: UnsafeRawBufferPointer) throws -> Value {
        try JSONDecoder().decode(type, from: Data(bytes))
    }
}
