@testable import DurableEntities
import Testing

@Suite("SmallList")
struct SmallListTests {
    @Test("holds its elements in order whether one is inline or many spill; collection operations agree with an array's")
    func order() {
        var list = SmallList<String>()
        #expect(list.isEmpty && list.count == 0 && Array(list) == [])
        list.append("a")
        #expect(!list.isEmpty && list.count == 1 && list.first == "a" && list[0] == "a")
        list.reserveCapacity(4)
        for element in ["b", "c", "d", "e"] { list.append(element) }
        #expect(Array(list) == ["a", "b", "c", "d", "e"])
        #expect(list.map { $0.uppercased() } == ["A", "B", "C", "D", "E"])
        #expect(list.contains("d") && !list.contains("z"))
        #expect(list[4] == "e" && list.last == "e")
        var visited: [String] = []
        for element in list { visited.append(element) }
        #expect(visited == Array(list))
    }
}
