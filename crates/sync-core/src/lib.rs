//! whisker-sync core: the sync protocol, engine, state and network clients, in
//! plain Rust. Nothing here knows about Lua; the Lua module and the reference
//! server both build on this crate.

pub mod engine;
pub mod patch;
pub mod protocol;
pub mod state;
pub mod transport;
pub mod value;
pub mod version_vector;
pub mod wire;

pub use protocol::{ConflictStrategy, OpType, Operation};
pub use value::{Map, Value};
pub use version_vector::{Causality, VersionVector};
