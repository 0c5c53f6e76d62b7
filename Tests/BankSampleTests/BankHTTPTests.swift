import Testing
@testable import BankSample
