//! `elkeid-agent` binary.
fn main() {}
