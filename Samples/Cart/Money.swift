/// Formatting of amounts held as integer cents.
enum Money {
    /// `12345` → `"$123.45"`, `-5` → `"-$0.05"`.
    static func format(_ cents: Int64) -> String {
        let magnitude = cents.magnitude
        let fraction = magnitude % 100
        return "\(cents < 0 ? "-" : "")$\(magnitude / 100).\(fraction < 10 ? "0" : "")\(fraction)"
    }
}
