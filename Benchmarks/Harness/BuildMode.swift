/// Whether this binary was built with optimisations, and the warning a debug build deserves.
enum BuildMode: String, Sendable, CustomStringConvertible {
    case debug
    case release

    #if DEBUG
    static let current = BuildMode.debug
    #else
    static let current = BuildMode.release
    #endif

    var description: String { rawValue }

    /// Printed to standard error before anything runs in a debug build.
    static let debugWarning = """

        ************************************************************************
        **                                                                    **
        **   WARNING: THIS IS A DEBUG BUILD OF THE BENCHMARKS.                **
        **                                                                    **
        **   Figures from a debug build are meaningless: no optimisation,     **
        **   no inlining, exclusivity checks on. Do not quote or compare      **
        **   them. Build and run the benchmarks with:                         **
        **                                                                    **
        **       swift run -c release Benchmarks                              **
        **                                                                    **
        ************************************************************************

        """
}
