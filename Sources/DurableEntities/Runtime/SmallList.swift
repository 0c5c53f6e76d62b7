/// A list that holds its first element inline and only the rest in an array.
///
/// A turn's lists nearly always hold one element or none: the messages it takes, the replies it
/// owes, the activity it schedules, the task it finishes. An array costs an allocation (and a free
/// on another thread, after the commit) even for one element; this costs none until the second.
struct SmallList<Element>: RandomAccessCollection {
    /// The first element; `nil` only while the list is empty.
    private var head: Element?
    /// The elements after the first.
    private var rest: [Element] = []

    init() {}

    var startIndex: Int { 0 }
    var endIndex: Int { head == nil ? 0 : 1 + rest.count }
    var isEmpty: Bool { head == nil }

    subscript(position: Int) -> Element {
        precondition(head != nil && position >= 0 && position <= rest.count, "index out of range")
        return position == 0 ? head.unsafelyUnwrapped : rest[position - 1]
    }

    mutating func append(_ element: Element) {
        if head == nil {
            head = element
        } else {
            rest.append(element)
        }
    }

    /// Makes room for `count` elements in all (the first needs none).
    mutating func reserveCapacity(_ count: Int) {
        if count > 1 { rest.reserveCapacity(count - 1) }
    }
}

extension SmallList: Sendable where Element: Sendable {}
