//! Prometheus metrics, rendered as text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Upper bounds (seconds) of the latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    pub operations_accepted: AtomicU64,
    pub operations_duplicate: AtomicU64,
    pub conflicts: AtomicU64,
    pub patches_applied: AtomicU64,
    pub patches_rejected: AtomicU64,
    pub pushes: AtomicU64,
    pub websocket_connections: AtomicI64,
    pub websocket_messages: AtomicU64,
    pub remote_changes_sent: AtomicU64,
}

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn record_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((route.to_owned(), method.to_owned(), status))
            .or_default() += 1;
        let seconds = elapsed.as_secs_f64();
        let mut latency = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        let histogram = latency.entry(route.to_owned()).or_default();
        for (bucket, bound) in histogram.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        header(
            &mut out,
            "whisker_sync_http_requests_total",
            "counter",
            "HTTP requests by route, method and status.",
        );
        for ((route, method, status), count) in &requests {
            let _ = writeln!(
                out,
                "whisker_sync_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {count}"
            );
        }
        header(
            &mut out,
            "whisker_sync_http_request_duration_seconds",
            "histogram",
            "HTTP request latency by route.",
        );
        for (route, h) in &latency {
            for (count, bound) in h.buckets.iter().zip(LATENCY_BUCKETS) {
                let _ = writeln!(
                    out,
                    "whisker_sync_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "whisker_sync_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "whisker_sync_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "whisker_sync_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        let counters: [(&str, &str, &AtomicU64); 8] = [
            (
                "whisker_sync_pushes_total",
                "Pushes processed (HTTP and WebSocket).",
                &self.pushes,
            ),
            (
                "whisker_sync_operations_accepted_total",
                "Operations stored.",
                &self.operations_accepted,
            ),
            (
                "whisker_sync_operations_duplicate_total",
                "Re-sent operations acknowledged without storing them again.",
                &self.operations_duplicate,
            ),
            (
                "whisker_sync_conflicts_total",
                "Pushed operations rejected as conflicts.",
                &self.conflicts,
            ),
            (
                "whisker_sync_patches_applied_total",
                "Patched updates applied and stored as full updates.",
                &self.patches_applied,
            ),
            (
                "whisker_sync_patches_rejected_total",
                "Patched updates refused as patch_rejected.",
                &self.patches_rejected,
            ),
            (
                "whisker_sync_websocket_messages_total",
                "WebSocket messages received.",
                &self.websocket_messages,
            ),
            (
                "whisker_sync_remote_changes_sent_total",
                "remote_change messages sent to WebSocket clients.",
                &self.remote_changes_sent,
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        header(
            &mut out,
            "whisker_sync_websocket_connections",
            "gauge",
            "Authenticated WebSocket connections open.",
        );
        let _ = writeln!(
            out,
            "whisker_sync_websocket_connections {}",
            self.websocket_connections.load(Ordering::Relaxed)
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Middleware: counts and times every request, and logs it (never headers or bodies).
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Label by route pattern, not the raw path, so clients cannot create label values.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics.record_request(&route, &method, status, elapsed);
    tracing::debug!(%method, %route, status, elapsed_ms = elapsed.as_secs_f64() * 1000.0, "request");
    response
}
