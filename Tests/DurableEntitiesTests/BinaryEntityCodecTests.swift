@testable import DurableEntities
import Foundation
import Synchronization
import Testing

@Suite("BinaryEntityCodec")
struct BinaryEntityCodecTests {
    let codec = BinaryEntityCodec()

    // MARK: Fixtures

    enum Signal: Codable, Equatable {
        case deposit(Int64)
        case transfer(to: String, amount: Int64, memo: String?)
        case close
        case tagged(Int, label: String)
    }

    struct AccountState: Codable, Equatable {
        var balance: Int64 = 0
        var deposits: Int64 = 0
        var lastAmount: Int64 = 0
        var overdraftLimit: Int64 = 0
        var dailyLimit: Int64 = 1_000_000
        var withdrawnToday: Int64 = 0
        var openedAtSeconds: Int64 = 1_700_000_000
        var branch: Int64 = 0
        var product: Int64 = 1
        var flags: Int64 = 0
        var interestBasisPoints: Int64 = 125
        var feesCharged: Int64 = 0
        var version: Int64 = 1
    }

    enum Color: String, Codable, Hashable { case red, green }

    struct Point: Codable, Hashable { var x: Int; var y: Int }

    struct Empty: Codable, Equatable {}

    struct Everything: Codable, Equatable {
        var int8: Int8 = .min
        var int16: Int16 = .min
        var int32: Int32 = .min
        var int64: Int64 = .min
        var int64Max: Int64 = .max
        var int: Int = .max
        var uint8: UInt8 = .max
        var uint16: UInt16 = .max
        var uint32: UInt32 = .max
        var uint64: UInt64 = .max
        var uint: UInt = .max
        var float: Float = -1.5
        var double: Double = .pi
        var yes = true
        var no = false
        var string = "héllo, wörld 🌍 — 日本語 \u{0} \"quoted\" \\ slash/"
        var emptyString = ""
        var long = String(repeating: "abcdefghij", count: 50)
        var date = Date(timeIntervalSinceReferenceDate: 123_456.789)
        var data = Data([0, 1, 2, 255])
        var emptyData = Data()
        var bytes: [UInt8] = [9, 8, 7, 0, 255]
        var present: Int? = 5
        var absent: String? = nil
        var someNil: Int?? = .some(nil)
        var someSome: Int?? = .some(.some(7))
        var tripleSomeNil: Int??? = .some(.some(nil))
        var none: Int?? = nil
        var array: [Int] = [1, -2, 3]
        var emptyArray: [String] = []
        var matrix: [[Double]] = [[1, 2], [], [3]]
        var byName: [String: Int] = ["b": 2, "a": 1, "": 0, "ü": 3]
        var byNumber: [Int: String] = [10: "ten", 2: "two", -1: "minus one"]
        var byDouble: [Double: String] = [1.5: "x", -0.5: "y"]
        var byColor: [Color: Int] = [.red: 1, .green: 2]
        var byPoint: [Point: String] = [Point(x: 1, y: 2): "p"]
        var signals: [Signal] = [.deposit(5), .transfer(to: "b", amount: -3, memo: nil), .close, .tagged(1, label: "l")]
        var optionals: [Int?] = [1, nil, 3]
        var doubleOptionals: [Int??] = [.some(nil), nil, .some(.some(1))]
        var empty = Empty()
        var account = AccountState()
        var nestedDictionary: [String: [String: [Int]]] = ["outer": ["inner": [1, 2]], "other": [:]]
    }

    func roundTrip<T: Codable>(_ value: T) throws -> T {
        let bytes = try codec.encode(value)
        return try bytes.withUnsafeBytes { try codec.decode(T.self, from: $0) }
    }

    func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) throws -> T {
        try bytes.withUnsafeBytes { try codec.decode(type, from: $0) }
    }

    // MARK: Round trips

    @Test("the benchmark messages round-trip and are smaller than JSON")
    func smallMessages() throws {
        #expect(try roundTrip(Signal.deposit(42)) == .deposit(42))
        #expect(try roundTrip(Signal.deposit(.min)) == .deposit(.min))
        var account = AccountState()
        account.balance = -12_345_678_901
        #expect(try roundTrip(account) == account)
        let json = JSONEntityCodec()
        #expect(try codec.encode(Signal.deposit(42)).count < json.encode(Signal.deposit(42)).count)
        #expect(try codec.encode(account).count < json.encode(account).count)
    }

    @Test("every kind of value round-trips")
    func everything() throws {
        let value = Everything()
        let decoded = try roundTrip(value)
        #expect(decoded == value)
        #expect(decoded.someNil == .some(nil))
        #expect(decoded.tripleSomeNil == .some(.some(nil)))
        #expect(decoded.none == nil)
        #expect(decoded.doubleOptionals == [.some(nil), nil, .some(.some(1))])
    }

    @Test("enums with associated values round-trip")
    func enums() throws {
        for signal: Signal in [.deposit(0), .deposit(.max), .transfer(to: "ü", amount: 1, memo: "m"),
                               .transfer(to: "", amount: .min, memo: nil), .close, .tagged(-1, label: "")] {
            #expect(try roundTrip(signal) == signal)
        }
        #expect(try roundTrip([Signal.close, .deposit(1)]) == [.close, .deposit(1)])
    }

    /// Same case names as ``Signal``, another type: the shared single-key answers are per key type.
    enum Twin: Codable, Equatable {
        case deposit(String)
        case close
    }

    @Test("single-key containers (enum cases, one-entry dictionaries) decode right however often they repeat")
    func singleKeyContainers() throws {
        for _ in 0..<3 {
            #expect(try roundTrip(Signal.deposit(7)) == .deposit(7))
            #expect(try roundTrip(Twin.deposit("7")) == .deposit("7"))
            #expect(try roundTrip(Signal.close) == .close)
            #expect(try roundTrip(Twin.close) == .close)
        }
        // More distinct one-entry dictionaries than the shared table has slots: entries are evicted and
        // rebuilt, never mixed up.
        for round in 0..<2 {
            for index in 0..<1_000 {
                let dictionary = ["key-\(index)": index + round]
                #expect(try roundTrip(dictionary) == dictionary)
            }
        }
        // A case this code does not know is an error every time (the empty answer is shared too).
        let unknown = try codec.encode(["withdraw": ["_0": 5]])
        for _ in 0..<3 {
            #expect(throws: DecodingError.self) { try unknown.withUnsafeBytes { try codec.decode(Signal.self, from: $0) } }
        }
    }

    @Test("integer extremes round-trip as top-level values")
    func integers() throws {
        #expect(try roundTrip(Int64.min) == .min)
        #expect(try roundTrip(Int64.max) == .max)
        #expect(try roundTrip(UInt64.max) == .max)
        #expect(try roundTrip(Int.min) == .min)
        #expect(try roundTrip(Int8.min) == .min)
        #expect(try roundTrip(UInt8.max) == .max)
        #expect(try roundTrip(Int32(-1)) == -1)
        #expect(try roundTrip(0) == 0)
        #expect(try roundTrip([Int64.min, -1, 0, 1, Int64.max]) == [.min, -1, 0, 1, .max])
        #expect(try roundTrip([UInt64.max, 0, 1 << 63]) == [.max, 0, 1 << 63])
    }

    @Test("top-level integers, Bool and String take a shortcut that writes and reads exactly what the general path does")
    func scalarShortcut() throws {
        func same<T: Codable & Equatable>(_ value: T) throws {
            let general = try BinaryEncoderState.encodeMessage(value)
            let shortcut = try #require(BinaryScalarMessage.encode(value))
            #expect(shortcut == general, "\(T.self) \(value)")
            #expect(try codec.encode(value) == general)
            #expect(try decode(T.self, general) == value)
            let generalRead = try general.withUnsafeBytes { try BinaryDecoderState.decodeMessage(T.self, from: $0) }
            #expect(generalRead == value)
        }
        for value: Int64 in [.min, .min + 1, -(1 << 62) - 1, -(1 << 62), -300, -1, 0, 1, 63, 64, 300, (1 << 62) - 1, 1 << 62, .max] { try same(value) }
        for value: Int in [.min, -1, 0, 1, .max] { try same(value) }
        for value: UInt64 in [0, 1, 127, 128, 1 << 62, 1 << 63, .max] { try same(value) }
        for value: Int32 in [.min, -1, 0, 1, .max] { try same(value) }
        try same(true)
        try same(false)
        for value in ["", "a", String(repeating: "x", count: 127), String(repeating: "é", count: 200), "héllo 🌍"] { try same(value) }

        // What the shortcut does not take, the general path reads (or rejects) as before.
        #expect(try decode(Int64.self, codec.encode(UInt64(7))) == 7)  // unsigned tag
        #expect(try decode(Int64.self, codec.encode(7.0)) == 7)  // a Double
        #expect(try decode(Int32.self, codec.encode(Int64(-5))) == -5)
        #expect(throws: DecodingError.self) { try decode(Int32.self, codec.encode(Int64.max)) }  // does not fit
        #expect(throws: DecodingError.self) { try decode(Int64.self, codec.encode(Int64(300)) + [0]) }  // trailing byte
        #expect(throws: DecodingError.self) { try decode(Int64.self, Array(codec.encode(Int64(300)).dropLast())) }  // truncated
        #expect(throws: DecodingError.self) { try decode(Bool.self, [BinaryFormat.marker, BinaryFormat.trueValue, 0]) }
        #expect(throws: DecodingError.self) { try decode(String.self, Array(codec.encode("abc").dropLast())) }
        #expect(throws: DecodingError.self) { try decode(String.self, codec.encode(Int64(1))) }
        #expect(throws: DecodingError.self) { try decode(Int64.self, codec.encode("1")) }
        let optional: Int64?? = .some(.some(3))  // an Optional wrapper before the value
        #expect(try decode(Int64.self, codec.encode(optional)) == 3)
    }

    @Test("special floating point values keep their bits")
    func floatingPoint() throws {
        for value in [Double.nan, .infinity, -.infinity, -0.0, 0.0, .leastNonzeroMagnitude, .greatestFiniteMagnitude, -1e-300] {
            #expect(try roundTrip(value).bitPattern == value.bitPattern)
            #expect(try roundTrip([value])[0].bitPattern == value.bitPattern)
        }
        for value in [Float.nan, .infinity, -.infinity, -0.0, .leastNonzeroMagnitude] {
            #expect(try roundTrip(value).bitPattern == value.bitPattern)
        }
        struct Holder: Codable { var value: Double; var other: Float }
        let holder = try roundTrip(Holder(value: -0.0, other: .nan))
        #expect(holder.value.sign == .minus && holder.value == 0)
        #expect(holder.other.isNaN)
    }

    @Test("strings, bytes and dates round-trip")
    func stringsBytesDates() throws {
        for string in ["", "a", "héllo 🌍", String(repeating: "é", count: 200), "\u{0}\u{1}\n"] {
            #expect(try roundTrip(string) == string)
        }
        #expect(try roundTrip([UInt8]()) == [])
        #expect(try roundTrip([UInt8](0...255)) == [UInt8](0...255))
        #expect(try roundTrip(Data([1, 2, 3])) == Data([1, 2, 3]))
        let date = Date(timeIntervalSince1970: 1_700_000_000.25)
        #expect(try roundTrip(date) == date)
        #expect(try roundTrip([date]) == [date])
    }

    @Test("optionals, nested optionals and Optional containers round-trip")
    func optionals() throws {
        #expect(try roundTrip(Int?.none) == nil)
        #expect(try roundTrip(Int?.some(3)) == 3)
        #expect(try roundTrip(Int??.some(nil)) == .some(nil))
        #expect(try roundTrip(Int??.none) == .none)
        #expect(try roundTrip(Int???.some(.some(nil))) == .some(.some(nil)))
        #expect(try roundTrip(AccountState?.some(AccountState())) == AccountState())
        #expect(try roundTrip([String?]([nil, "x"])) == [nil, "x"])
        #expect(try roundTrip(Empty()) == Empty())
        #expect(try roundTrip([Empty(), Empty()]) == [Empty(), Empty()])
    }

    @Test("large containers, whose headers need several bytes, round-trip")
    func largeContainers() throws {
        let points = (0..<300).map { Point(x: $0, y: -$0 * 1_000_000) }
        #expect(try roundTrip(points) == points)
        let dictionary = Dictionary(uniqueKeysWithValues: (0..<300).map { ("key\($0)", $0) })
        #expect(try roundTrip(dictionary) == dictionary)
        let nested = (0..<20).map { i in (0..<20).map { j in "\(i)-\(j)-" + String(repeating: "x", count: j * 10) } }
        #expect(try roundTrip(nested) == nested)
    }

    @Test("dictionaries encode to the same bytes whatever their insertion order")
    func deterministicDictionaries() throws {
        var forward: [String: Int] = [:]
        var backward: [String: Int] = [:]
        for i in 0..<100 { forward["k\(i)"] = i }
        for i in (0..<100).reversed() { backward["k\(i)"] = i }
        #expect(try codec.encode(forward) == codec.encode(backward))
        #expect(try codec.encode([3: "c", 1: "a", 2: "b"]) == codec.encode([1: "a", 2: "b", 3: "c"]))
    }

    // MARK: Unusual Codable implementations

    /// Writes into a nested container after writing into its parent: the streaming encoder cannot,
    /// so the codec falls back to the isolated one.
    struct OutOfOrder: Codable, Equatable {
        var a: Int
        var x: String
        var y: [Int]
        var b: Bool

        enum CodingKeys: String, CodingKey { case a, inner, b }
        enum InnerKeys: String, CodingKey { case x, y }

        init(a: Int, x: String, y: [Int], b: Bool) {
            self.a = a
            self.x = x
            self.y = y
            self.b = b
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            var inner = container.nestedContainer(keyedBy: InnerKeys.self, forKey: .inner)
            var list = inner.nestedUnkeyedContainer(forKey: .y)
            try container.encode(a, forKey: .a)
            try inner.encode(x, forKey: .x)
            for value in y { try list.encode(value) }
            try container.encode(b, forKey: .b)
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            let inner = try container.nestedContainer(keyedBy: InnerKeys.self, forKey: .inner)
            b = try container.decode(Bool.self, forKey: .b)
            y = try inner.decode([Int].self, forKey: .y)
            x = try inner.decode(String.self, forKey: .x)
            a = try container.decode(Int.self, forKey: .a)
        }
    }

    class Animal: Codable {
        var name: String
        init(name: String) { self.name = name }
        enum CodingKeys: String, CodingKey { case name }
    }

    /// Shares the encoder with its superclass: both ask it for a keyed container.
    final class Dog: Animal {
        var legs: Int
        init(name: String, legs: Int) {
            self.legs = legs
            super.init(name: name)
        }
        enum DogKeys: String, CodingKey { case legs }
        override func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: DogKeys.self)
            try container.encode(legs, forKey: .legs)
            try super.encode(to: encoder)
        }
        required init(from decoder: any Decoder) throws {
            legs = try decoder.container(keyedBy: DogKeys.self).decode(Int.self, forKey: .legs)
            try super.init(from: decoder)
        }
    }

    /// Encodes its superclass through `superEncoder()`.
    final class Cat: Animal {
        var lives: Int
        init(name: String, lives: Int) {
            self.lives = lives
            super.init(name: name)
        }
        enum CatKeys: String, CodingKey { case lives }
        override func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CatKeys.self)
            try super.encode(to: container.superEncoder())
            try container.encode(lives, forKey: .lives)
        }
        required init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CatKeys.self)
            lives = try container.decode(Int.self, forKey: .lives)
            try super.init(from: container.superDecoder())
        }
    }

    /// Writes nothing at all.
    struct Silent: Codable, Equatable {
        func encode(to encoder: any Encoder) throws {}
        init() {}
        init(from decoder: any Decoder) throws {}
    }

    @Test("containers used out of nesting order, superEncoder and shared containers round-trip")
    func unusualImplementations() throws {
        let value = OutOfOrder(a: 1, x: "x", y: [1, 2, 3], b: true)
        #expect(try roundTrip(value) == value)
        #expect(try roundTrip([value, value]) == [value, value])
        #expect(try roundTrip(["k": value]) == ["k": value])

        let dog = try roundTrip(Dog(name: "Rex", legs: 4))
        #expect(dog.name == "Rex" && dog.legs == 4)
        let cat = try roundTrip(Cat(name: "Tom", lives: 9))
        #expect(cat.name == "Tom" && cat.lives == 9)
        let cats = try roundTrip([Cat(name: "a", lives: 1), Cat(name: "b", lives: 2)])
        #expect(cats.map(\.name) == ["a", "b"] && cats.map(\.lives) == [1, 2])

        #expect(try roundTrip(Silent()) == Silent())
        #expect(try roundTrip([Silent()]) == [Silent()])
    }

    @Test("out-of-order containers and superEncoder take the isolated encoder; synthesized types do not")
    func fallbackIsTaken() throws {
        func violates<T: Encodable>(_ value: T) throws -> Bool {
            let state = BinaryEncoderState(isolated: false, root: 1)
            state.put(BinaryFormat.marker)
            do { try state.encodeValue(value, at: state.slot) } catch is BinaryEncodingRestart {}
            return state.violated
        }
        #expect(try violates(OutOfOrder(a: 1, x: "x", y: [1], b: true)))
        #expect(try violates(Cat(name: "Tom", lives: 9)))
        #expect(try !violates(Dog(name: "Rex", legs: 4)))
        #expect(try !violates(Everything()))
        #expect(try !violates(Silent()))
    }

    /// Encodes a message of its own inside `encode(to:)`, while its own message is being encoded.
    struct Wrapper: Codable, Equatable {
        var inner: Everything
        var label: String
        enum CodingKeys: String, CodingKey { case inner, label }
        init(inner: Everything, label: String) {
            self.inner = inner
            self.label = label
        }
        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(BinaryEntityCodec().encode(inner), forKey: .inner)
            try container.encode(label, forKey: .label)
        }
        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            let bytes = try container.decode([UInt8].self, forKey: .inner)
            inner = try bytes.withUnsafeBytes { try BinaryEntityCodec().decode(Everything.self, from: $0) }
            label = try container.decode(String.self, forKey: .label)
        }
    }

    /// Throws after writing part of its container.
    struct Refuses: Encodable {
        enum CodingKeys: String, CodingKey { case a, b }
        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(1, forKey: .a)
            var nested = container.nestedUnkeyedContainer(forKey: .b)
            try nested.encode("half")
            throw EncodingError.invalidValue(self, .init(codingPath: [], debugDescription: "refused"))
        }
    }

    @Test("a thread's encoder state is kept between messages: each message encodes as with a new state, after a large one, a failed one, one that fell back to the isolated encoder, or one encoded inside another")
    func keptEncoderState() throws {
        let everything = Everything()
        let fresh = BinaryEncoderState(isolated: false, root: 1)
        fresh.put(BinaryFormat.marker)
        try fresh.encodeValue(everything, at: fresh.slot)
        while fresh.depth > 0 { fresh.closeTop() }
        let expected = Array(fresh.written)
        /// Encodes `everything` on the state the thread kept, as the next message would, checking
        /// that it streams (a state left dirty would fall back to the isolated encoder, which hides
        /// the damage in the bytes), then gives it back.
        func encodeOnKeptState() throws {
            let state = try #require(EncoderStates.take(), "the thread kept no encoder state")
            state.put(BinaryFormat.marker)
            try state.encodeValue(everything, at: state.slot)
            #expect(!state.violated)
            while state.depth > 0 { state.closeTop() }
            #expect(Array(state.written) == expected)
            #expect(state.prepareForReuse())
            EncoderStates.keep(state)
        }
        #expect(try codec.encode(everything) == expected)
        try encodeOnKeptState()
        #expect(try codec.encode(everything) == expected)
        try encodeOnKeptState()
        // Larger than a kept state's buffer may be: it is not kept; the next message makes a new one.
        let large = Array(repeating: "a string of some length", count: 2_000)
        #expect(try decode([String].self, codec.encode(large)) == large)
        #expect(EncoderStates.take() == nil)
        #expect(try codec.encode(everything) == expected)
        try encodeOnKeptState()
        // A message that throws half-way leaves nothing behind.
        #expect(throws: EncodingError.self) { try codec.encode(Refuses()) }
        try encodeOnKeptState()
        // Out-of-order containers (the isolated encoder), then a message inside a message.
        let outOfOrder = OutOfOrder(a: 1, x: "x", y: [1, 2, 3], b: true)
        #expect(try roundTrip(outOfOrder) == outOfOrder)
        try encodeOnKeptState()
        let wrapper = Wrapper(inner: everything, label: "outer")
        #expect(try roundTrip(wrapper) == wrapper)
        #expect(try roundTrip([wrapper, wrapper]) == [wrapper, wrapper])
        try encodeOnKeptState()
        // Many threads at once, each with its own state.
        let results = Mutex<[[UInt8]]>([])
        DispatchQueue.concurrentPerform(iterations: 64) { index in
            var state = AccountState()
            state.balance = Int64(index)
            let bytes = (try? BinaryEntityCodec().encode(state)) ?? []
            let back = try? bytes.withUnsafeBytes { try BinaryEntityCodec().decode(AccountState.self, from: $0) }
            if back != state { results.withLock { $0.append(bytes) } }
        }
        #expect(results.withLock { $0.isEmpty })
    }

    @Test("the format is stable: golden bytes")
    func goldenBytes() throws {
        let deposit: [UInt8] = [0xB1, 0x09, 0x11, 0x01, 0x07] + Array("deposit".utf8)
            + [0x09, 0x06, 0x01, 0x02] + Array("_0".utf8) + [0x03, 0x02]
        #expect(try codec.encode(Signal.deposit(1)) == deposit)
        #expect(try decode(Signal.self, deposit) == .deposit(1))
        #expect(try codec.encode(Int64(-1)) == [0xB1, 0x03, 0x01])
        #expect(try codec.encode(UInt64(300)) == [0xB1, 0x04, 0xAC, 0x02])
        #expect(try codec.encode("é") == [0xB1, 0x07, 0x02, 0xC3, 0xA9])
        #expect(try codec.encode([true, false]) == [0xB1, 0x0A, 0x03, 0x02, 0x02, 0x01])
        #expect(try codec.encode(Int??.some(nil)) == [0xB1, 0x0B, 0x00])
        #expect(try codec.encode([UInt8]([1, 2])) == [0xB1, 0x08, 0x02, 0x01, 0x02])
        #expect(try codec.encode(1.0) == [0xB1, 0x06] + withUnsafeBytes(of: (1.0).bitPattern.littleEndian, Array.init))
    }

    @Test("a type that encodes two values into one single value container is an EncodingError")
    func doubleEncode() throws {
        struct Twice: Encodable {
            func encode(to encoder: any Encoder) throws {
                var container = encoder.singleValueContainer()
                try container.encode(1)
                try container.encode(2)
            }
        }
        #expect(throws: EncodingError.self) { try codec.encode(Twice()) }
        #expect(throws: EncodingError.self) { try codec.encode(["a": Twice()]) }
    }

    // MARK: Schema evolution

    struct V1: Codable, Equatable {
        var a: Int
        enum CodingKeys: String, CodingKey { case a }
    }
    struct V2: Codable, Equatable { var a: Int; var b: String? }
    struct V3: Codable, Equatable { var b: String?; var c: [Point]?; var a: Int64 }
    struct Reordered: Codable, Equatable {
        var z: Int
        var a: Int
    }
    struct Widened: Codable { var a: Int64; var b: Double; var c: Int; var d: UInt64?; var e: Float }
    struct Narrow: Codable { var a: Int8; var b: Int; var c: Double; var d: UInt8; var e: Double }

    @Test("fields added later as optionals decode as nil; unknown fields are skipped")
    func schemaEvolution() throws {
        let v2 = try decode(V2.self, codec.encode(V1(a: 7)))
        #expect(v2 == V2(a: 7, b: nil))
        let v1 = try decode(V1.self, codec.encode(V2(a: 8, b: "new")))
        #expect(v1 == V1(a: 8))
        // Unknown keys holding containers are skipped too, wherever they are.
        let v3 = V3(b: "x", c: [Point(x: 1, y: 2)], a: 9)
        #expect(try decode(V1.self, codec.encode(v3)) == V1(a: 9))
        #expect(try decode(V2.self, codec.encode(v3)) == V2(a: 9, b: "x"))
        #expect(try decode(V3.self, codec.encode(V1(a: 1))) == V3(b: nil, c: nil, a: 1))
        // Field order does not matter.
        struct ZA: Codable { var a: Int; var z: Int }
        #expect(try decode(Reordered.self, codec.encode(ZA(a: 1, z: 2))) == Reordered(z: 2, a: 1))
        // Optional fields of containers, nested inside arrays.
        #expect(try decode([V2].self, codec.encode([V1(a: 1), V1(a: 2)])) == [V2(a: 1, b: nil), V2(a: 2, b: nil)])
    }

    @Test("numbers read into any type they fit")
    func numberConversions() throws {
        let narrow = Narrow(a: -5, b: 7, c: 3, d: 200, e: 0.5)
        let wide = try decode(Widened.self, codec.encode(narrow))
        #expect(wide.a == -5 && wide.b == 7 && wide.c == 3 && wide.d == 200 && wide.e == 0.5)
        #expect(try decode(Int8.self, codec.encode(UInt64(100))) == 100)
        #expect(try decode(UInt8.self, codec.encode(Int64(255))) == 255)
        let tooBig = try codec.encode(Int64(300))
        #expect(throws: DecodingError.self) { try decode(Int8.self, tooBig) }
        #expect(throws: DecodingError.self) { try decode(UInt64.self, codec.encode(Int64(-1))) }
        #expect(throws: DecodingError.self) { try decode(Int.self, codec.encode(1.5)) }
        #expect(throws: DecodingError.self) { try decode(Int64.self, codec.encode(UInt64.max)) }
    }

    @Test("JSON written by JSONEntityCodec still decodes")
    func readsJSON() throws {
        let json = JSONEntityCodec()
        let signal = Signal.transfer(to: "x", amount: 3, memo: nil)
        let bytes = try json.encode(signal)
        #expect(try decode(Signal.self, bytes) == signal)
        #expect(try decode(AccountState.self, json.encode(AccountState())) == AccountState())
    }

    @Test("the runtime runs on it: signals, updates, snapshots, replay after reopen, and JSON histories from before")
    func runtimeIntegration() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        func configuration(_ codec: any EntityCodec) -> EntityRuntime.Configuration {
            var configuration = EntityRuntime.Configuration(directory: directory.path, snapshotEvery: 7, codec: codec, logger: quietLogger)
            configuration.journal.logger = quietLogger
            return configuration
        }
        // A history written with JSON, then continued and replayed with the binary codec.
        do {
            let runtime = try EntityRuntime(configuration: configuration(JSONEntityCodec()))
            let alice = runtime.entity(Account.self, id: "alice")
            for _ in 0..<10 { try await alice.signal(.deposit(10)) }
            runtime.close()
        }
        do {
            let runtime = try EntityRuntime(configuration: configuration(codec))
            let alice = runtime.entity(Account.self, id: "alice")
            #expect(try await alice.query { $0 } == Account.State(balance: 100, deposits: 10))
            for _ in 0..<15 { try await alice.signal(.deposit(10)) }
            #expect(try await alice.update(.withdraw(40)) == 210)
            runtime.close()
        }
        let runtime = try EntityRuntime(configuration: configuration(codec))
        defer { runtime.close() }
        let alice = runtime.entity(Account.self, id: "alice")
        #expect(try await alice.query { $0 } == Account.State(balance: 210, deposits: 25))
    }

    // MARK: Errors

    @Test("every truncation of a valid encoding throws a DecodingError")
    func truncation() throws {
        var everything = Everything()
        everything.byName = ["a": 1]  // keep it small enough to try every prefix
        everything.long = "long"
        let messages: [[UInt8]] = [
            try codec.encode(everything),
            try codec.encode(Signal.deposit(1)),
            try codec.encode(AccountState()),
            try codec.encode(OutOfOrder(a: 1, x: "x", y: [1], b: false)),
        ]
        for bytes in messages {
            for length in 0..<bytes.count {
                let prefix = Array(bytes[..<length])
                #expect(throws: DecodingError.self, "prefix of \(length) bytes") {
                    try prefix.withUnsafeBytes { _ = try codec.decode(Everything.self, from: $0) }
                }
                #expect(throws: DecodingError.self) { try decode(Signal.self, prefix) }
                #expect(throws: DecodingError.self) { try decode(AccountState.self, prefix) }
            }
        }
        // Trailing bytes are an error too.
        #expect(throws: DecodingError.self) { try decode(Signal.self, codec.encode(Signal.deposit(1)) + [0]) }
    }

    @Test("garbage and corrupted encodings throw or decode, never trap")
    func garbage() throws {
        var generator = BinaryCodecTestRandom(seed: 0x5EED)
        var everything = Everything()
        everything.long = "long"
        let valid = try codec.encode(everything)
        let signal = try codec.encode(Signal.transfer(to: "someone", amount: 12, memo: "m"))
        var decodedAnyway = 0
        for round in 0..<3_000 {
            var bytes = round % 2 == 0 ? valid : signal
            switch round % 3 {
            case 0:  // flip a few bytes
                for _ in 0..<(1 + Int(generator.next() % 4)) {
                    bytes[1 + Int(generator.next() % UInt64(bytes.count - 1))] = UInt8(truncatingIfNeeded: generator.next())
                }
            case 1:  // random bytes after the format byte
                bytes = [BinaryFormat.marker] + (0..<Int(generator.next() % 64)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
            default:  // random bytes with small tags, so containers and varints are exercised
                bytes = [BinaryFormat.marker] + (0..<Int(generator.next() % 64)).map { _ in UInt8(truncatingIfNeeded: generator.next() % 16) }
            }
            do {
                _ = try decode(Everything.self, bytes)
                decodedAnyway += 1
            } catch is DecodingError {}
            do {
                _ = try decode(Signal.self, bytes)
                decodedAnyway += 1
            } catch is DecodingError {}
            do {
                _ = try decode([String: [Int?]].self, bytes)
                decodedAnyway += 1
            } catch is DecodingError {}
        }
        // Bytes that are not the format (nor JSON) are rejected up front.
        #expect(throws: DecodingError.self) { try decode(Int.self, [0x00, 0x01]) }
        #expect(throws: DecodingError.self) { try decode(Int.self, []) }
        #expect(throws: DecodingError.self) { try decode(Int.self, Array("{\"broken".utf8)) }
        // An over-long varint.
        #expect(throws: DecodingError.self) { try decode(UInt64.self, [BinaryFormat.marker, BinaryFormat.unsigned] + [UInt8](repeating: 0xFF, count: 11)) }
        #expect(decodedAnyway >= 0)
    }

    final class Node: Codable {
        var next: Node?
        init(next: Node?) { self.next = next }
    }

    /// `{"next": {"next": ... {} ...}}`, `depth` levels, written directly (encoding a chain that
    /// deep would recurse just as deep).
    static func nestedNodes(_ depth: Int) -> [UInt8] {
        let entryHead: [UInt8] = [0x01, 0x04] + Array("next".utf8)  // count 1, key "next"
        var sizes = [3]  // the innermost value: an empty keyed container
        for level in 1...depth { sizes.append(1 + BinaryFormat.varintSize(entryHead.count + sizes[level - 1]) + entryHead.count + sizes[level - 1]) }
        var bytes: [UInt8] = [BinaryFormat.marker]
        for level in stride(from: depth, through: 1, by: -1) {
            bytes.append(BinaryFormat.keyed)
            BinaryFormat.appendVarint(UInt64(entryHead.count + sizes[level - 1]), to: &bytes)
            bytes += entryHead
        }
        return bytes + [BinaryFormat.keyed, 1, 0]
    }

    @Test("deeply nested input is rejected with a DecodingError, not a stack overflow")
    func deepNesting() throws {
        var depth = 0
        var node: Node? = try decode(Node.self, Self.nestedNodes(200))
        while let current = node { depth += 1; node = current.next }
        #expect(depth == 201)
        #expect(throws: DecodingError.self) { try decode(Node.self, Self.nestedNodes(10_000)) }
        // And what the codec writes for a chain is what was built by hand.
        var chain = Node(next: nil)
        for _ in 0..<3 { chain = Node(next: chain) }
        #expect(try codec.encode(chain) == Self.nestedNodes(3))
    }

    @Test("type mismatches are typeMismatch errors with the coding path")
    func typeMismatch() throws {
        struct StringField: Codable { var a: String }
        struct InnerStrings: Codable { var values: [String] }
        struct OuterStrings: Codable { var inner: InnerStrings }
        struct InnerInts: Codable { var values: [Int] }
        struct OuterInts: Codable { var inner: InnerInts }

        func paths(_ body: () throws -> Void) -> (kind: String, path: [String])? {
            do {
                try body()
                return nil
            } catch let DecodingError.typeMismatch(_, context) {
                return ("typeMismatch", context.codingPath.map(\.stringValue))
            } catch let DecodingError.keyNotFound(key, context) {
                return ("keyNotFound", context.codingPath.map(\.stringValue) + [key.stringValue])
            } catch let DecodingError.valueNotFound(_, context) {
                return ("valueNotFound", context.codingPath.map(\.stringValue))
            } catch {
                return ("other: \(error)", [])
            }
        }

        let stringField = try codec.encode(StringField(a: "x"))
        #expect(paths { _ = try decode(V1.self, stringField) }! == ("typeMismatch", ["a"]))

        let outer = try codec.encode(OuterStrings(inner: InnerStrings(values: ["a", "b"])))
        #expect(paths { _ = try decode(OuterInts.self, outer) }! == ("typeMismatch", ["inner", "values", "Index 0"]))

        let nested = try codec.encode(["x": OuterStrings(inner: InnerStrings(values: ["a"]))])
        #expect(paths { _ = try decode([String: OuterInts].self, nested) }! == ("typeMismatch", ["x", "inner", "values", "Index 0"]))

        // A struct where an array is stored, and the reverse.
        #expect(paths { _ = try decode(V1.self, codec.encode([1, 2])) }! == ("typeMismatch", []))
        #expect(paths { _ = try decode([Int].self, codec.encode(V1(a: 1))) }! == ("typeMismatch", []))

        // Missing keys and nil where a value is required.
        #expect(paths { _ = try decode(V1.self, codec.encode(V2(a: 1, b: nil))) } == nil)
        #expect(paths { _ = try decode(V1.self, codec.encode(Empty())) }! == ("keyNotFound", ["a"]))
        struct NilA: Encodable {
            func encode(to encoder: any Encoder) throws {
                var container = encoder.container(keyedBy: V1.CodingKeys.self)
                try container.encodeNil(forKey: .a)
            }
        }
        #expect(paths { _ = try decode(V1.self, codec.encode(NilA())) }! == ("valueNotFound", ["a"]))
        #expect(paths { _ = try decode(Signal.self, codec.encode(Signal.tagged(1, label: "x"))) } == nil)
        #expect(paths { _ = try decode([Int].self, codec.encode([1, nil, 3] as [Int?])) }! == ("valueNotFound", ["Index 1"]))
    }
}

/// A small deterministic generator, so failures reproduce.
struct BinaryCodecTestRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
