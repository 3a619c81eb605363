//! `elkeid-center` binary.
fn main() {}
