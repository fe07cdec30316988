//! The `cairn-operator` binary.

fn main() {}
