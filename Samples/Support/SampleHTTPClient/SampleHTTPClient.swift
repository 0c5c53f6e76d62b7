import NIOCore
import NIOHTTP1
import NIOPosix

/// A small keep-alive HTTP/1.1 client for the samples' tests and load generator (in progress).
public enum SampleHTTPClient {}
