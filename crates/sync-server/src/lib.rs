//! whisker-sync reference server: the HTTP + WebSocket endpoint every device
//! syncs with. Keeps the old Lua transports' wire format (docs/PROTOCOL.md)
//! and adds idempotent pushes, per-namespace sequence numbers, conflict
//! reporting, pagination and snapshots. SQLite by default; PostgreSQL for
//! several processes sharing one database.
//!
//! The binary is a thin wrapper over [`cli::run`]; tests can build the
//! router in-process with [`routes::router`] and an [`state::AppState`].

pub mod blobs;
pub mod cli;
pub mod compression;
pub mod config;
pub mod error;
pub mod hub;
pub mod keys;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod validate;
pub mod ws;

pub use routes::router;
pub use state::AppState;
