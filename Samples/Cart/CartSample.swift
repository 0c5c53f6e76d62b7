import ArgumentParser

/// The shopping-cart sample (in progress): carts, inventory and a checkout saga as durable entities.
@main
struct CartSample: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "CartSample")
}
