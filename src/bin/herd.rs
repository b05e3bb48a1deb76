//! `herd`: the command-line client for herdd (see `herd --help`).

fn main() {
    std::process::exit(herd_client::cli::main());
}
