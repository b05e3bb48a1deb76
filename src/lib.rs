//! The `herd` package: the `herdd` and `herd` binaries, and the quickstart
//! that runs the whole system end to end (used by `examples/quickstart.rs`
//! and by the end-to-end test).

pub mod quickstart;
