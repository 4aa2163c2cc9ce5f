//! The relay under test: exactly `haven-relay`'s entry point.

fn main() -> std::process::ExitCode {
    haven_server::cli::main()
}
