//! Prints the CRD YAML that `crds/` holds: `crdgen cluster > crds/cluster.yaml`,
//! `crdgen backup > crds/backup.yaml`, or `crdgen` for both as one multi-document stream.

use std::process::ExitCode;

fn main() -> ExitCode {
    let kind = std::env::args().nth(1);
    match cairn_operator::crd_yaml(kind.as_deref()) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}
