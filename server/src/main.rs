//! `haven-relay`: parses configuration, sets up logging, binds and runs the relay.

fn main() -> std::process::ExitCode {
    haven_server::cli::main()
}
