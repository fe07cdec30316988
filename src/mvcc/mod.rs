//! The revisioned keyspace (placeholder until the implementation lands).

mod types;
pub use self::types::*;
