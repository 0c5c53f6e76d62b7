import Testing
@testable import CartSample
