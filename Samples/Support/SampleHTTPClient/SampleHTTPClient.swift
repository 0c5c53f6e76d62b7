import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// A response: the status code, the headers and the whole body.
public struct SampleHTTPResponse: Sendable {
    /// The status code, such as `200` or `404`.
    public let status: Int
    /// The body's bytes (empty when there was none).
    public let body: [UInt8]
    /// The response headers, in the order the server sent them.
    public let headers: [(name: String, value: String)]

    /// Creates a response (the client does; tests may too).
    public init(status: Int, body: [UInt8], headers: [(name: String, value: String)] = []) {
        self.status = status
        self.body = body
        self.headers = headers
    }

    /// Decodes the body as JSON.
    /// - Throws: the `DecodingError` of `JSONDecoder`.
    public func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try JSONDecoder().decode(type, from: Data(body))
    }

    /// The body as UTF-8 text.
    public var text: String { String(decoding: body, as: UTF8.self) }

    /// The first value of the header `name` (compared case-insensitively), if any.
    public func header(_ name: String) -> String? {
        headers.first { $0.name.caseInsensitiveCompare(name) == .orderedSame }?.value
    }
}

/// A small keep-alive HTTP/1.1 client on SwiftNIO, for the samples' tests and load generators.
///
/// One client holds one connection and sends one request at a time on it: concurrent calls to
/// ``request(_:_:body:contentType:)`` queue up and go out in call order, each after the previous
/// response. For concurrency, open several clients. When the server closes the connection (after a
/// `Connection: close` response, an error such as 413, or an idle timeout), the next request opens a
/// new one; a request already sent is never resent, since it may not be idempotent.
///
/// It is deliberately small: no TLS, no redirects, no chunked request bodies, no timeouts (the
/// tests' and the load generator's own deadlines bound a call).
///
/// ## Usage
/// ```swift
/// let client = try await SampleHTTPClient(port: 8080)
/// let response = try await client.request("POST", "/accounts/alice/deposits",
///                                         json: ["amount": "100", "requestId": "r-1"])
/// print(response.status, response.text)
/// try await client.close()
/// ```
public final class SampleHTTPClient: Sendable {
    /// The largest response body accepted (16 MiB); a larger one fails the request.
    public static let maxResponseBytes = 16 << 20

    private let host: String
    private let port: Int
    private let group: any EventLoopGroup
    /// The connection, replaced when the server has closed it; `nil` once closed for good.
    private let connection: Mutex<Connection>
    /// The completion of the last request queued: the next request waits for it (FIFO order).
    private let tail: Mutex<EventLoopFuture<Void>>

    private enum Connection {
        case open(any Channel)
        case closed
    }

    /// Connects to `host:port`.
    /// - Parameters:
    ///   - host: the server's address (a name or an IP address).
    ///   - port: the server's TCP port.
    /// - Throws: the connection error when the server cannot be reached.
    public init(host: String = "127.0.0.1", port: Int) async throws {
        self.host = host
        self.port = port
        self.group = MultiThreadedEventLoopGroup.singleton
        let channel = try await Self.connect(group: group, host: host, port: port)
        self.connection = Mutex(.open(channel))
        self.tail = Mutex(channel.eventLoop.makeSucceededVoidFuture())
    }

    /// Sends a request and returns the whole response.
    /// - Parameters:
    ///   - method: the HTTP method, such as `"GET"` or `"POST"`.
    ///   - path: the path and query, starting with `/`.
    ///   - body: the request body's bytes; `nil` sends none.
    ///   - contentType: the body's `Content-Type` (ignored without a body).
    /// - Returns: the response.
    /// - Throws: ``SampleHTTPClientError`` after ``close()``; a NIO error when the connection fails
    ///   or closes before the response arrives.
    public func request(
        _ method: String, _ path: String, body: [UInt8]? = nil, contentType: String = "application/json"
    ) async throws -> SampleHTTPResponse {
        // Queue behind the previous request: one request at a time on the connection.
        let turn = group.any().makePromise(of: Void.self)
        let previous = tail.withLock { tail in
            defer { tail = turn.futureResult }
            return tail
        }
        defer { turn.succeed() }
        _ = try? await previous.get()

        let channel = try await openChannel()
        var head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: method), uri: path)
        head.headers.add(name: "Host", value: "\(host):\(port)")
        if let body {
            head.headers.add(name: "Content-Type", value: contentType)
            head.headers.add(name: "Content-Length", value: "\(body.count)")
        } else if ["POST", "PUT", "PATCH"].contains(method) {
            head.headers.add(name: "Content-Length", value: "0")
        }
        let bodyBuffer = body.map { ByteBuffer(bytes: $0) }
        let promise = channel.eventLoop.makePromise(of: NIOHTTPClientResponseFull.self)
        // A write that fails before reaching the handler (the connection just closed) fails the response.
        let written = channel.eventLoop.makePromise(of: Void.self)
        written.futureResult.whenFailure { promise.fail($0) }
        channel.writeAndFlush(PendingRequest(head: head, body: bodyBuffer, response: promise), promise: written)
        let full = try await promise.futureResult.get()

        if !full.head.isKeepAlive { try? await channel.close() }
        var bytes = full.body ?? ByteBuffer()
        return SampleHTTPResponse(
            status: Int(full.head.status.code),
            body: bytes.readBytes(length: bytes.readableBytes) ?? [],
            headers: full.head.headers.map { (name: $0.name, value: $0.value) })
    }

    /// Sends `json` encoded by `JSONEncoder` as the body, with `Content-Type: application/json`.
    /// - Returns: the response.
    /// - Throws: the `EncodingError` of `JSONEncoder`, or what ``request(_:_:body:contentType:)`` throws.
    public func request<B: Encodable>(_ method: String, _ path: String, json: B) async throws -> SampleHTTPResponse {
        let body = try JSONEncoder().encode(json)
        return try await request(method, path, body: Array(body))
    }

    /// Closes the connection. Requests after it throw ``SampleHTTPClientError``.
    public func close() async throws {
        let previous = connection.withLock { connection in
            defer { connection = .closed }
            return connection
        }
        if case .open(let channel) = previous, channel.isActive {
            do { try await channel.close() } catch ChannelError.alreadyClosed {}
        }
    }

    /// The open connection, or a new one when the server has closed the previous one.
    private func openChannel() async throws -> any Channel {
        switch connection.withLock({ $0 }) {
        case .closed:
            throw SampleHTTPClientError(message: "the client was closed")
        case .open(let channel) where channel.isActive:
            return channel
        case .open:
            let channel = try await Self.connect(group: group, host: host, port: port)
            let stale = connection.withLock { connection -> Bool in
                guard case .open = connection else { return true }
                connection = .open(channel)
                return false
            }
            if stale {
                try? await channel.close()
                throw SampleHTTPClientError(message: "the client was closed")
            }
            return channel
        }
    }

    private static func connect(group: any EventLoopGroup, host: String, port: Int) async throws -> any Channel {
        try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandlers([
                        NIOHTTPClientResponseAggregator(maxContentLength: maxResponseBytes),
                        ResponseMatcher(),
                    ])
                }
            }
            .connect(host: host, port: port)
            .get()
    }
}

/// What ``SampleHTTPClient`` throws for its own misuse (a request after ``SampleHTTPClient/close()``).
public struct SampleHTTPClientError: Error, CustomStringConvertible {
    /// What went wrong.
    public let message: String
    public var description: String { "SampleHTTPClientError: \(message)" }
}

/// A request on its way to the connection, with the promise its response completes.
private struct PendingRequest: Sendable {
    let head: HTTPRequestHead
    let body: ByteBuffer?
    let response: EventLoopPromise<NIOHTTPClientResponseFull>
}

/// Writes requests and matches responses to them in order; fails what is outstanding when the
/// connection errors or closes. Lives on the channel's event loop.
private final class ResponseMatcher: ChannelDuplexHandler {
    typealias InboundIn = NIOHTTPClientResponseFull
    typealias OutboundIn = PendingRequest
    typealias OutboundOut = HTTPClientRequestPart

    private var outstanding: [EventLoopPromise<NIOHTTPClientResponseFull>] = []

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let request = unwrapOutboundIn(data)
        outstanding.append(request.response)
        context.write(wrapOutboundOut(.head(request.head)), promise: nil)
        if let body = request.body { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        context.write(wrapOutboundOut(.end(nil)), promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let response = unwrapInboundIn(data)
        guard !outstanding.isEmpty else { return }  // unsolicited: ignore
        outstanding.removeFirst().succeed(response)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failOutstanding(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        failOutstanding(ChannelError.ioOnClosedChannel)
        context.fireChannelInactive()
    }

    private func failOutstanding(_ error: any Error) {
        let failed = outstanding
        outstanding = []
        for promise in failed { promise.fail(error) }
    }
}
