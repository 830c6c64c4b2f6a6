//! Engine overhead per request (written below).
fn main() {}
