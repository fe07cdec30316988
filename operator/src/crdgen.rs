//! Prints the CRD YAML that `crds/` holds.

fn main() {}
