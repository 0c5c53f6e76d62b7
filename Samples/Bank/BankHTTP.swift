import Foundation
import Hummingbird
import Logging

/// The bank's HTTP API on a Hummingbird router: JSON bodies, amounts in integer cents, every
/// refusal a 4xx (or a 503) with a JSON body `{"error": "<code>", "message": "…"}`.
///
/// | route | body | answer |
/// | --- | --- | --- |
/// | `POST /accounts/{id}/deposits` | `{"amount", "requestId"}` | 200 `{"accountId", "balance"}` |
/// | `POST /accounts/{id}/withdrawals` | `{"amount", "requestId"}` | 200 `{"accountId", "balance"}`, 409 `insufficient_funds` |
/// | `GET /accounts/{id}` | | 200 `{"accountId", "balance"}` |
/// | `POST /transfers` | `{"transferId", "from", "to", "amount"}` | 202 `{"transferId", "status", "from", "to", "amount"}` |
/// | `GET /transfers/{id}` | | 200 the transfer, 404 `not_found` |
/// | `GET /transfers/{id}?waitFor=completed,rejected&timeoutMs=10000` | | 200 the transfer once its status is one of those, or as it is after the timeout (a long poll; at most 30 s) |
/// | `GET /transfers/{id}/run` | | 200 the transfer's run: its status and what it waits for — money moves with their attempt, last failure and next attempt; timers with their due time (see `Bank.TransferRunView`), 404 `not_found` |
/// | `POST /transfers/{id}/retry` | | 200 `{"transferId", "retried": [{"name", "attempt"}]}`: the steps that waited for their next attempt after a failure, or were paused, start it now (an operator's "retry now"), 404 `not_found` |
/// | `POST /transfers/{id}/pause` | | 200 `{"transferId", "paused": [{"name", "attempt", "afterRunningAttempt"}]}`: no step in flight starts another attempt until a retry (an operator's "pause"; a running attempt goes on), 404 `not_found` |
/// | `POST /transfers/{id}/approve`, `…/reject` | `{"requestId"}` | 200 the transfer, 409 `not_awaiting_approval` |
/// | `POST /transfers/{id}/cancel` | | 202 the transfer (it refunds and ends `cancelled` unless its deposit has begun), 409 `transfer_finished` |
enum BankHTTP {
    /// The router, with every route and the middleware that writes errors as JSON.
    static func router(bank: Bank, logger: Logger) -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: LogRequestsMiddleware(.debug))
        router.add(middleware: ErrorMiddleware(logger: logger))

        router.post("/accounts/:id/deposits") { request, context in
            let body = try await decode(MoneyRequest.self, request)
            return try json(await bank.deposit(account: context.parameters.require("id"), cents: body.amount, requestId: body.requestId))
        }
        router.post("/accounts/:id/withdrawals") { request, context in
            let body = try await decode(MoneyRequest.self, request)
            return try json(await bank.withdraw(account: context.parameters.require("id"), cents: body.amount, requestId: body.requestId))
        }
        router.get("/accounts/:id") { _, context in
            try json(await bank.account(context.parameters.require("id")))
        }
        router.post("/transfers") { request, context in
            let body = try await decode(TransferRequest.self, request)
            let transfer = try await bank.startTransfer(id: body.transferId, from: body.from, to: body.to, cents: body.amount)
            return try json(transfer, status: .accepted)
        }
        router.get("/transfers/:id") { request, context in
            let id = try context.parameters.require("id")
            guard let wanted = request.uri.queryParameters["waitFor"] else { return try json(await bank.transfer(id)) }
            let (statuses, timeout) = try waitParameters(String(wanted), request.uri.queryParameters["timeoutMs"].map(String.init))
            return try json(await bank.transfer(id, waitingFor: statuses, timeout: timeout))
        }
        router.get("/transfers/:id/run") { _, context in
            try json(bank.transferRun(context.parameters.require("id")))
        }
        router.post("/transfers/:id/retry") { _, context in
            try json(await bank.retryTransfer(context.parameters.require("id")))
        }
        router.post("/transfers/:id/pause") { _, context in
            try json(await bank.pauseTransfer(context.parameters.require("id")))
        }
        router.post("/transfers/:id/approve") { request, context in
            let body = try await decode(DecisionRequest.self, request)
            return try json(await bank.decide(context.parameters.require("id"), approve: true, requestId: body.requestId))
        }
        router.post("/transfers/:id/reject") { request, context in
            let body = try await decode(DecisionRequest.self, request)
            return try json(await bank.decide(context.parameters.require("id"), approve: false, requestId: body.requestId))
        }
        router.post("/transfers/:id/cancel") { _, context in
            try json(await bank.cancelTransfer(context.parameters.require("id")), status: .accepted)
        }
        return router
    }

    /// `waitFor` (comma-separated statuses) and `timeoutMs` (default 10,000, at most 30,000).
    static func waitParameters(_ wanted: String, _ timeoutMs: String?) throws(BankError) -> (Set<Transfer.Status>, Duration) {
        var statuses = Set<Transfer.Status>()
        for name in wanted.split(separator: ",") {
            guard let status = Transfer.Status(rawValue: String(name)), status != .new else {
                throw BankError(.invalidRequest, "waitFor: '\(name)' is not a transfer status (running, awaiting_approval, completed, compensated, rejected, failed, cancelled)")
            }
            statuses.insert(status)
        }
        guard !statuses.isEmpty else { throw BankError(.invalidRequest, "waitFor names no status") }
        var milliseconds = 10_000
        if let timeoutMs {
            guard let value = Int(timeoutMs), (0...30_000).contains(value) else {
                throw BankError(.invalidRequest, "timeoutMs must be an integer in 0...30000, not '\(timeoutMs)'")
            }
            milliseconds = value
        }
        return (statuses, .milliseconds(milliseconds))
    }

    // MARK: Bodies

    /// A deposit or a withdrawal.
    struct MoneyRequest: Codable, Sendable {
        var amount: Int64
        var requestId: String
    }

    /// A new transfer. Its `transferId` is its idempotency key: posting it again returns the same transfer.
    struct TransferRequest: Codable, Sendable {
        var transferId: String
        var from: String
        var to: String
        var amount: Int64
    }

    /// An approval or a rejection.
    struct DecisionRequest: Codable, Sendable {
        var requestId: String
    }

    /// A field that did not decode, named (the decoder does not say which number failed to fit).
    struct FieldError: Error {
        let field: String
        let underlying: any Error
    }

    /// The body of every error response.
    struct ErrorBody: Codable, Sendable {
        var error: String
        var message: String
    }

    /// Reads at most ``BankLimits/maxBodyBytes`` of the body and decodes it as JSON.
    /// - Throws: ``BankError``: `bodyTooLarge`, `malformedJSON`, or the code of the first bad field
    ///   (`invalidAmount` for `amount`, `invalidRequestID` for `requestId`, `invalidRequest` otherwise).
    static func decode<Body: Decodable>(_ type: Body.Type, _ request: Request) async throws -> Body {
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: BankLimits.maxBodyBytes)
        } catch let error as any HTTPResponseError where error.status == .contentTooLarge {  // NIOTooManyBytesError
            throw BankError(.bodyTooLarge, "the body is larger than \(BankLimits.maxBodyBytes) bytes")
        }
        do {
            return try JSONDecoder().decode(Body.self, from: Data(buffer.readableBytesView))
        } catch let error as FieldError {
            throw bankError(field: error.field, error.underlying)
        } catch {
            throw bankError(field: nil, error)  // not JSON, or not an object
        }
    }

    /// The ``BankError`` a client can act on, naming the field that did not decode.
    private static func bankError(field: String?, _ error: any Error) -> BankError {
        switch field {
        case nil: return BankError(.malformedJSON, "the body is not valid JSON, or not a JSON object", underlying: error)
        case "amount": return BankError(.invalidAmount, "amount must be a positive integer number of cents", underlying: error)
        case "requestId": return BankError(.invalidRequestID, "requestId must be a non-empty string", underlying: error)
        case let field?: return BankError(.invalidRequest, "field '\(field)' is missing or not a string", underlying: error)
        }
    }

    // MARK: Responses

    /// `value` as a JSON response.
    static func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys  // the same bytes every time: a retry's answer is identical
        let bytes = try encoder.encode(value)
        var headers = HTTPFields()
        headers[.contentType] = "application/json; charset=utf-8"
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// The HTTP status of a refusal.
    static func status(_ code: BankError.Code) -> HTTPResponse.Status {
        switch code {
        case .bodyTooLarge: .contentTooLarge
        case .notFound: .notFound
        case .insufficientFunds, .notAwaitingApproval, .transferConflict, .transferFinished: .conflict
        case .unavailable: .serviceUnavailable
        default: .badRequest
        }
    }

    /// Writes every error as `{"error", "message"}`: ``BankError``s with their code, Hummingbird's own
    /// (an unknown route, a wrong method) with a code from their status.
    struct ErrorMiddleware<Context: RequestContext>: RouterMiddleware {
        let logger: Logger

        func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
            do {
                return try await next(request, context)
            } catch let error as BankError {
                let status = BankHTTP.status(error.code)
                if status.kind == .serverError {
                    logger.warning("request failed", metadata: ["http.path": "\(request.uri.path)", "error": "\(error)"])
                }
                return try json(ErrorBody(error: error.code.name, message: error.message), status: status)
            } catch let error as any HTTPResponseError {
                let code = error.status == .notFound ? "not_found" : error.status == .contentTooLarge ? "body_too_large" : "invalid_request"
                return try json(ErrorBody(error: code, message: error.status.reasonPhrase), status: error.status)
            }
        }
    }
}

// Each field decodes through `field(_:_:)`, so a failure names its field.
extension BankHTTP.MoneyRequest {
    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        amount = try container.field(Int64.self, .amount)
        requestId = try container.field(String.self, .requestId)
    }
}

extension BankHTTP.TransferRequest {
    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        transferId = try container.field(String.self, .transferId)
        from = try container.field(String.self, .from)
        to = try container.field(String.self, .to)
        amount = try container.field(Int64.self, .amount)
    }
}

extension BankHTTP.DecisionRequest {
    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        requestId = try container.field(String.self, .requestId)
    }
}

extension KeyedDecodingContainer {
    /// Decodes the field `key`; any failure (missing, wrong type, a number that is no `Int64`) is
    /// reported as a ``BankHTTP/FieldError`` naming it.
    fileprivate func field<Value: Decodable>(_ type: Value.Type, _ key: Key) throws -> Value {
        do {
            return try decode(Value.self, forKey: key)
        } catch {
            // Not always a DecodingError: a number that is no Int64 (10.5, 1e30) comes as an internal error.
            throw BankHTTP.FieldError(field: key.stringValue, underlying: error)
        }
    }
}
