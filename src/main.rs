fn main() {
    std::process::exit(handgrad::cli::main());
}
