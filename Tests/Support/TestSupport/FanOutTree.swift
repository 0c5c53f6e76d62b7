import DurableEntities

/// A tree of child entities for the fan-out tests, the crash child and the `fanout` benchmark: a node
/// with `depth > 0` starts `width` children one level down (at most `maxConcurrent` at once) and sums
/// their outputs; a leaf (`depth == 0`) computes its value through the ``LeafWork`` activity.
public struct FanNode: EntityWorkflow {
    public struct Input: Codable, Sendable {
        public var width: Int
        public var depth: Int
        public var maxConcurrent: Int

        public init(width: Int, depth: Int, maxConcurrent: Int) {
            self.width = width
            self.depth = depth
            self.maxConcurrent = maxConcurrent
        }
    }

    public struct State: Codable, Sendable {
        /// Children that failed (a node then fails too).
        public var failedChildren = 0
    }

    public typealias Signal = NoMessage
    public typealias Update = NoMessage
    public typealias Output = Int64

    public static var entityType: String { "FanNode" }
    public static func initialState(id: String) -> State { State() }

    public static func run(_ input: Input, context: WorkflowContext<Self>) async throws -> Int64 {
        guard input.depth > 0 else {
            return try await context.execute(LeafWork.self, context.id)
        }
        let below = Input(width: input.width, depth: input.depth - 1, maxConcurrent: input.maxConcurrent)
        let children = (0..<input.width).map { (id: "\(context.id).\($0)", input: below) }
        let results = try await context.fanOut(FanNode.self, children, maxConcurrent: input.maxConcurrent)
        var sum: Int64 = 0
        for result in results {
            switch result {
            case .success(let value): sum += value
            case .failure(let failure):
                context.updateState { $0.failedChildren += 1 }
                throw failure
            }
        }
        return sum
    }

    /// The sum a tree of `width` and `depth` under `root` must produce.
    public static func expectedSum(root: String, width: Int, depth: Int) -> Int64 {
        guard depth > 0 else { return LeafWork.value(of: root) }
        return (0..<width).reduce(Int64(0)) { $0 + expectedSum(root: "\(root).\($1)", width: width, depth: depth - 1) }
    }
}

/// A leaf's small piece of deterministic work: a value derived from its id. `onRun` observes attempts.
public struct LeafWork: Activity {
    public typealias Input = String
    public typealias Output = Int64
    let onRun: @Sendable (String) -> Void

    public init(onRun: @escaping @Sendable (String) -> Void = { _ in }) { self.onRun = onRun }

    public func run(_ id: String, context: ActivityContext) async throws -> Int64 {
        onRun(id)
        return Self.value(of: id)
    }

    /// FNV-1a of the id, reduced to 1...1,000.
    public static func value(of id: String) -> Int64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in id.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return Int64(hash % 1_000) + 1
    }
}
