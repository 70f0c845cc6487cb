//! Network clients for the sync server: HTTP ([`http`]), WebSocket
//! ([`websocket`]) and large assets ([`blob`]), async on tokio, with TLS from
//! [`tls`] and negotiated gzip from [`compression`].
//!
//! Wire shapes are those of [`crate::wire`]; docs/PROTOCOL.md describes them.

pub mod blob;
pub mod compression;
pub mod http;
pub mod tls;
pub mod websocket;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Payload bytes a client has sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// Shared counters behind [`Traffic`].
#[derive(Debug, Default)]
pub(crate) struct TrafficCounter {
    sent: AtomicU64,
    received: AtomicU64,
}

impl TrafficCounter {
    pub(crate) fn add(&self, sent: usize, received: usize) {
        self.sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.received.fetch_add(received as u64, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Traffic {
        Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// A random fraction in [0, 1) for backoff jitter (std's per-instance random
/// hash keys; no cryptographic quality needed).
pub(crate) fn random_fraction() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0x9e37_79b9_7f4a_7c15);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `d` in seconds as people write it: `30s`, `0.5s`.
pub fn format_seconds(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{}s", secs as u64)
    } else {
        format!("{}s", (secs * 1000.0).round() / 1000.0)
    }
}

/// A duration from seconds given by a caller (negative or non-finite = zero).
pub fn seconds(secs: f64) -> Duration {
    if secs.is_finite() && secs > 0.0 {
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}
