import Foundation

/// Which `malloc` the process runs on: jemalloc when the benchmarks were linked with it (see
/// `Package.swift`) or it was preloaded, otherwise the C library's. Reported with every figure,
/// since it moves them (the README's "Deployment" has the measurements).
enum Allocator {
    /// `"jemalloc 5.3.0-…"` or `"system"`.
    static let current: String = {
        typealias MallCtl = @convention(c) (
            UnsafePointer<CChar>?, UnsafeMutableRawPointer?, UnsafeMutablePointer<Int>?, UnsafeMutableRawPointer?, Int
        ) -> Int32
        // RTLD_DEFAULT (a null handle): the symbol as every library in the process resolves it.
        guard let symbol = dlsym(nil, "mallctl") else { return "system" }
        let mallctl = unsafeBitCast(symbol, to: MallCtl.self)
        var version: UnsafePointer<CChar>?
        var length = MemoryLayout<UnsafePointer<CChar>?>.size
        guard mallctl("version", &version, &length, nil, 0) == 0, let version else { return "jemalloc" }
        return "jemalloc " + String(cString: version)
    }()
}

/// How the Swift runtime is linked: `"static"` when the binary carries it (release builds of the
/// benchmarks, see `Package.swift`), `"dynamic"` when it was loaded from `libswiftCore.so`. Reported
/// with every figure, since it moves them (the README's "Deployment" has the measurements).
enum SwiftRuntimeLinkage {
    static let current: String = {
        // RTLD_NOLOAD: only asks whether the library is already mapped into the process.
        guard let handle = dlopen("libswiftCore.so", RTLD_LAZY | RTLD_NOLOAD) else { return "static" }
        dlclose(handle)
        return "dynamic"
    }()
}
