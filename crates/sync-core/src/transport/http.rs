//! HTTP client for the sync server (`GET /operations`, `POST /operations`,
//! `GET /version`), on reqwest with rustls.
//!
//! [`HttpClient::send`] is one request with the retry policy: connect errors,
//! timeouts, 5xx and 429 are retried up to `max_retries` times with exponential
//! backoff and jitter (`retry_delay · 2ⁿ`, scaled by a random factor in
//! [0.5, 1)), honouring a `Retry-After` of whole seconds; other statuses are
//! returned at once. A request without a body whose connection closes before
//! any answer (a kept-alive one the server closed, as after a restart) is
//! tried again at once, up to four times, without using up a retry. The
//! timeout covers each whole attempt, connection to last body byte. Bodies are
//! read up to a size limit.
//!
//! Compression (docs/PROTOCOL.md, "Compression"): every request says
//! `Accept-Encoding: gzip` and gzip answers are decoded here (so
//! [`Traffic`] counts the bytes that crossed the network). A request body
//! larger than [`MIN_COMPRESS_BYTES`] is sent gzip-compressed once the server
//! has said it accepts that, by an `Accept-Encoding` header on any earlier
//! answer (RFC 7694); a server that then answers 415 gets the body again,
//! uncompressed, and no compressed bodies after that. A server that never
//! advertises anything never sees a compressed body.
//! [`HttpTransport`] adds the sync calls with typed answers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_TYPE, RANGE, RETRY_AFTER,
};
use thiserror::Error;

use super::blob::BlobClient;
use super::compression::{self, lists_gzip, CompressionError, GZIP, MIN_COMPRESS_BYTES};
use super::{format_seconds, random_fraction, tls, Traffic, TrafficCounter};
use crate::protocol::Operation;
use crate::value::Value;
use crate::wire::{FetchResponse, PushRequest, PushResponse, VersionResponse};

/// Default largest response body accepted, in bytes.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// How many pooled connections found closed a request without a body tries
/// past (after a server restart, every kept-alive connection is); they are
/// not retries.
const STALE_CONNECTIONS: u32 = 4;
/// Longest `Retry-After` honoured; longer waits are cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why an HTTP exchange failed. Messages name the cause and the URL.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("connection refused to {url}")]
    Refused { url: String },
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
    /// TLS failed (e.g. the certificate is not trusted): not worth retrying.
    #[error("TLS with {url} failed: {detail}")]
    TlsHandshake { url: String, detail: String },
    #[error("timed out after {} waiting for {url}", format_seconds(*.after))]
    Timeout { url: String, after: Duration },
    #[error("request to {url} failed: {detail}")]
    Request { url: String, detail: String },
    /// The connection closed before any answer: most often a kept-alive one
    /// the server had closed (it restarted, or timed the connection out).
    #[error("request to {url} failed: {detail}")]
    Dropped { url: String, detail: String },
    #[error("response from {url} is larger than the {limit}-byte limit")]
    TooLarge { url: String, limit: usize },
    #[error("server returned HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("Empty response body")]
    EmptyBody,
    #[error("invalid JSON from server: {0}")]
    InvalidJson(String),
    #[error("Invalid response: {0}")]
    InvalidResponse(String),
    #[error("cannot encode request: {0}")]
    Encode(String),
    #[error("cannot decode the answer from {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: CompressionError,
    },
    #[error("invalid URL {url}: {detail}")]
    InvalidUrl { url: String, detail: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{source} (gave up after {attempts} attempts)")]
    GaveUp {
        attempts: u32,
        #[source]
        source: Box<HttpError>,
    },
}

impl HttpError {
    /// Failures worth another attempt: the server may answer next time.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            HttpError::Refused { .. }
                | HttpError::Connect { .. }
                | HttpError::Timeout { .. }
                | HttpError::Request { .. }
                | HttpError::Dropped { .. }
        )
    }

    /// The HTTP status, when the server answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            HttpError::GaveUp { source, .. } => source.status(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
}

/// One request and its retry policy.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Per attempt, connection to last body byte.
    pub timeout: Duration,
    pub max_retries: u32,
    pub retry_delay: Duration,
    pub max_response_bytes: usize,
}

/// A response as received (any status).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Attempts made, 1 when the first one was answered.
    pub attempts: u32,
}

/// A connection pool with TLS set up; cheap to clone (clones share the
/// pool, the traffic counters and what was learnt about the server).
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    traffic: Arc<TrafficCounter>,
    /// The server said it accepts gzip request bodies.
    server_gzip: Arc<AtomicBool>,
    /// Off: no `Accept-Encoding`, no compressed bodies (plain HTTP as the old client spoke it).
    compression: bool,
}

/// The detail of a reqwest error: its innermost cause.
fn detail(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The TLS error inside a reqwest error, if TLS is what failed. Errors are
/// followed through their sources and into the errors io::Errors wrap.
fn tls_failure(error: &reqwest::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<tokio_rustls::rustls::Error>() {
            return Some(tls.to_string());
        }
        cause = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// A reqwest failure as an [`HttpError`] naming `url`.
pub(crate) fn network_error(url: &str, timeout: Duration, e: reqwest::Error) -> HttpError {
    let url = url.to_owned();
    if e.is_timeout() {
        HttpError::Timeout {
            url,
            after: timeout,
        }
    } else if e.is_builder() {
        HttpError::InvalidUrl {
            url,
            detail: detail(&e),
        }
    } else if let Some(detail) = tls_failure(&e) {
        HttpError::TlsHandshake { url, detail }
    } else if refused(&e) {
        HttpError::Refused { url }
    } else if e.is_connect() {
        HttpError::Connect {
            url,
            detail: detail(&e),
        }
    } else {
        HttpError::Request {
            url,
            detail: detail(&e),
        }
    }
}

/// Whether `error` or any error in its chain of causes is a `C` that `test` accepts.
fn caused_by<C: std::error::Error + 'static>(
    error: &reqwest::Error,
    test: impl Fn(&C) -> bool,
) -> bool {
    let first: &(dyn std::error::Error + 'static) = error;
    std::iter::successors(Some(first), |e| e.source())
        .any(|e| e.downcast_ref::<C>().is_some_and(&test))
}

/// Whether the connection closed before the server answered at all.
fn closed_before_answer(error: &reqwest::Error) -> bool {
    caused_by(error, hyper::Error::is_incomplete_message)
}

fn refused(error: &reqwest::Error) -> bool {
    caused_by(error, |io: &std::io::Error| {
        io.kind() == std::io::ErrorKind::ConnectionRefused
    })
}

/// The message of an error response: its JSON `error` field, else its text.
pub fn error_message(status: u16, body: &[u8]) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        if let Some(Value::Str(message)) = map.get("error") {
            return message.clone();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if !text.is_empty() && text.len() <= 200 {
        return text.to_owned();
    }
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
        .to_owned()
}

fn retry_after(headers: &[(String, String)]) -> Option<Duration> {
    let (_, value) = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(RETRY_AFTER.as_str()))?;
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Backoff before retry number `retry` (1-based): `base · 2^(retry-1)` scaled
/// by a random factor in [0.5, 1).
pub fn backoff(base: Duration, retry: u32) -> Duration {
    let exponential = base.saturating_mul(1u32 << (retry - 1).min(16));
    exponential.mul_f64(0.5 + random_fraction() / 2.0)
}

impl HttpClient {
    /// A client trusting the system roots and, when given, the certificates in `ca_file`.
    pub fn new(ca_file: Option<&std::path::Path>) -> Result<Self, HttpError> {
        let tls = tls::client_config(ca_file)?;
        // Answers are decoded here, not by reqwest, so traffic counts wire bytes.
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .no_gzip()
            .build()
            .map_err(|e| HttpError::Tls(tls::TlsError::Setup(detail(&e))))?;
        Ok(HttpClient {
            client,
            traffic: Arc::default(),
            server_gzip: Arc::default(),
            compression: true,
        })
    }

    /// This client without compression: it asks for plain answers and sends
    /// plain bodies, whatever the server accepts.
    pub fn without_compression(mut self) -> Self {
        self.compression = false;
        self
    }

    /// Whether this client negotiates compression (the default).
    pub fn compresses(&self) -> bool {
        self.compression
    }

    /// Bytes sent and received on the network so far (compressed sizes).
    pub fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    /// Whether the server has said it accepts gzip-compressed request bodies.
    pub fn server_accepts_gzip(&self) -> bool {
        self.compression && self.server_gzip.load(Ordering::Relaxed)
    }

    pub(crate) fn reqwest(&self) -> &reqwest::Client {
        &self.client
    }

    pub(crate) fn count(&self, sent: usize, received: usize) {
        self.traffic.add(sent, received);
    }

    /// Remembers what an answer's headers say about compressed requests:
    /// `Accept-Encoding` listing gzip turns them on (a 415 turns them off,
    /// in [`HttpClient::send`]).
    pub(crate) fn learn(&self, headers: &reqwest::header::HeaderMap) {
        if let Some(value) = headers.get(ACCEPT_ENCODING).and_then(|v| v.to_str().ok()) {
            self.server_gzip.store(lists_gzip(value), Ordering::Relaxed);
        }
    }

    pub(crate) fn refuse_gzip(&self) {
        self.server_gzip.store(false, Ordering::Relaxed);
    }

    /// Sends `request`, retrying as the module docs describe. An answer with
    /// an error status is a response, not an error (after any retries).
    pub async fn send(&self, request: &Request) -> Result<Response, HttpError> {
        let mut body = self.encode_body(request)?;
        let mut attempt = 0;
        let mut dropped = 0;
        loop {
            let outcome = match self.attempt(request, &body).await {
                Ok(response) if response.status == 415 && body.gzip => {
                    // The server no longer takes gzip: send it plain (not a retry).
                    self.refuse_gzip();
                    body = self.encode_body(request)?;
                    self.attempt(request, &body).await
                }
                outcome => outcome,
            };
            let bodiless = request.body.is_none();
            if bodiless
                && matches!(outcome, Err(HttpError::Dropped { .. }))
                && dropped < STALE_CONNECTIONS
            {
                // A pooled connection found closed says nothing about the
                // server: try again at once, without using up a retry. A
                // request with a body may have been cut mid-transfer instead,
                // so that counts as an attempt.
                dropped += 1;
                continue;
            }
            attempt += 1;
            let retry = match &outcome {
                Ok(response) => response.status >= 500 || response.status == 429,
                Err(e) => e.is_transient(),
            };
            if !retry || attempt > request.max_retries {
                return match outcome {
                    Ok(mut response) => {
                        response.attempts = attempt;
                        Ok(response)
                    }
                    Err(e) if attempt > 1 => Err(HttpError::GaveUp {
                        attempts: attempt,
                        source: Box::new(e),
                    }),
                    Err(e) => Err(e),
                };
            }
            let wait = match &outcome {
                Ok(response) => retry_after(&response.headers),
                Err(_) => None,
            }
            .unwrap_or_else(|| backoff(request.retry_delay, attempt));
            tokio::time::sleep(wait).await;
        }
    }

    /// The body as it goes on the wire: gzip-compressed when it is JSON
    /// larger than [`MIN_COMPRESS_BYTES`] and the server accepts gzip (other
    /// bodies, and bodies the caller encoded, are left to the caller).
    fn encode_body(&self, request: &Request) -> Result<WireBody, HttpError> {
        let Some(body) = &request.body else {
            return Ok(WireBody::default());
        };
        let header = |wanted: &str| {
            request
                .headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
                .map(|(_, value)| value.as_str())
        };
        let json = header(CONTENT_TYPE.as_str()).is_some_and(|t| t.contains("json"));
        let encoded_by_caller = header(CONTENT_ENCODING.as_str()).is_some();
        if json
            && !encoded_by_caller
            && body.len() > MIN_COMPRESS_BYTES
            && self.server_accepts_gzip()
        {
            let packed = compression::gzip(body).map_err(|e| HttpError::Encode(e.to_string()))?;
            if packed.len() < body.len() {
                return Ok(WireBody {
                    bytes: Some(packed),
                    gzip: true,
                });
            }
        }
        Ok(WireBody {
            bytes: Some(body.clone()),
            gzip: false,
        })
    }

    async fn attempt(&self, request: &Request, body: &WireBody) -> Result<Response, HttpError> {
        let url = request.url.as_str();
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| HttpError::Encode(format!("header name {name:?}: {e}")))?;
            if name == CONTENT_LENGTH {
                continue; // set from the body
            }
            let value = HeaderValue::from_str(value)
                .map_err(|e| HttpError::Encode(format!("header {name}: {e}")))?;
            headers.insert(name, value);
        }
        if self.compression
            && !headers.contains_key(ACCEPT_ENCODING)
            && !headers.contains_key(RANGE)
        {
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(GZIP));
        }
        if body.gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static(GZIP));
        }
        let method = match request.method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
        };
        let mut builder = self
            .client
            .request(method, url)
            .headers(headers)
            .timeout(request.timeout);
        let sent = body.bytes.as_ref().map_or(0, Vec::len);
        if let Some(bytes) = &body.bytes {
            builder = builder.body(bytes.clone());
        }
        let network = |e: reqwest::Error| network_error(url, request.timeout, e);
        let mut response = builder.send().await.map_err(|e| {
            if closed_before_answer(&e) {
                HttpError::Dropped {
                    url: url.to_owned(),
                    detail: detail(&e),
                }
            } else {
                network(e)
            }
        })?;
        self.learn(response.headers());
        let too_large = || HttpError::TooLarge {
            url: url.to_owned(),
            limit: request.max_response_bytes,
        };
        if response
            .content_length()
            .is_some_and(|n| n > request.max_response_bytes as u64)
        {
            return Err(too_large());
        }
        let status = response.status().as_u16();
        let gzipped = response
            .headers()
            .get(CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(GZIP.as_bytes()));
        let headers = response
            .headers()
            .iter()
            .filter(|(name, _)| !gzipped || (*name != CONTENT_ENCODING && *name != CONTENT_LENGTH))
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut raw = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(network)? {
            if raw.len() + chunk.len() > request.max_response_bytes {
                return Err(too_large());
            }
            raw.extend_from_slice(&chunk);
        }
        self.traffic.add(sent, raw.len());
        let body = if gzipped {
            compression::gunzip(&raw, request.max_response_bytes).map_err(|e| match e {
                CompressionError::TooLarge { .. } => too_large(),
                source => HttpError::Decode {
                    url: url.to_owned(),
                    source,
                },
            })?
        } else {
            raw
        };
        Ok(Response {
            status,
            headers,
            body,
            attempts: 1,
        })
    }
}

/// A request body as sent: possibly gzip-compressed.
#[derive(Default)]
struct WireBody {
    bytes: Option<Vec<u8>>,
    gzip: bool,
}

/// Settings of an [`HttpTransport`]; [`HttpConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Server URL the paths are appended to, e.g. `https://sync.example.com/api`.
    pub base_url: String,
    pub api_key: String,
    /// Per attempt (default 30 s).
    pub timeout: Duration,
    /// Retries after the first attempt (default 3).
    pub max_retries: u32,
    /// First backoff delay (default 1 s).
    pub retry_delay: Duration,
    pub user_agent: String,
    /// Extra trusted certificates (PEM).
    pub ca_file: Option<PathBuf>,
    pub max_response_bytes: usize,
    /// Negotiate gzip with the server (default true).
    pub compression: bool,
}

impl HttpConfig {
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        HttpConfig {
            base_url: base_url.into(),
            api_key: api_key.into(),
            timeout: Duration::from_secs(30),
            max_retries: 3,
            retry_delay: Duration::from_secs(1),
            user_agent: "Whisker-Sync/1.0".to_owned(),
            ca_file: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            compression: true,
        }
    }
}

/// Percent-encodes a query value the way the old Lua transport did (space as `+`).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.replace('\n', "\r\n").bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The sync calls over HTTP, with typed answers.
#[derive(Clone)]
pub struct HttpTransport {
    config: HttpConfig,
    client: HttpClient,
}

impl HttpTransport {
    pub fn new(config: HttpConfig) -> Result<Self, HttpError> {
        let mut client = HttpClient::new(config.ca_file.as_deref())?;
        if !config.compression {
            client = client.without_compression();
        }
        Ok(HttpTransport { config, client })
    }

    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// Bytes sent and received on the network so far.
    pub fn traffic(&self) -> Traffic {
        self.client.traffic()
    }

    /// The blob (asset) calls of this server and key, sharing this
    /// transport's connections; `chunk_bytes` 0 is the default chunk size.
    pub fn blobs(&self, chunk_bytes: usize) -> BlobClient {
        BlobClient::new(self.config.clone(), self.client.clone(), chunk_bytes)
    }

    fn request(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Request {
        let config = &self.config;
        let mut headers = vec![
            ("User-Agent".to_owned(), config.user_agent.clone()),
            (
                "Authorization".to_owned(),
                format!("Bearer {}", config.api_key),
            ),
            ("Accept".to_owned(), "application/json".to_owned()),
        ];
        if body.is_some() {
            headers.push(("Content-Type".to_owned(), "application/json".to_owned()));
        }
        Request {
            method,
            url: format!("{}{path}", config.base_url),
            headers,
            body,
            timeout: config.timeout,
            max_retries: config.max_retries,
            retry_delay: config.retry_delay,
            max_response_bytes: config.max_response_bytes,
        }
    }

    /// Sends and decodes a JSON answer; statuses other than `ok` are errors.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: Request,
        ok: &[u16],
    ) -> Result<T, HttpError> {
        let response = self.client.send(&request).await?;
        let retried = response.attempts;
        if !ok.contains(&response.status) {
            let error = HttpError::Status {
                status: response.status,
                message: error_message(response.status, &response.body),
            };
            return Err(if retried > 1 {
                HttpError::GaveUp {
                    attempts: retried,
                    source: Box::new(error),
                }
            } else {
                error
            });
        }
        decode(&response.body)
    }

    /// One page of operations after `since` (all of them when `limit` is `None`).
    pub async fn fetch_operations(
        &self,
        device_id: &str,
        since: u64,
        limit: Option<u64>,
    ) -> Result<FetchResponse, HttpError> {
        self.fetch_page(device_id, since, limit, false).await
    }

    /// As [`HttpTransport::fetch_operations`]; with `patches`, updates may
    /// arrive as patches (see [`crate::patch`]).
    pub async fn fetch_page(
        &self,
        device_id: &str,
        since: u64,
        limit: Option<u64>,
        patches: bool,
    ) -> Result<FetchResponse, HttpError> {
        let mut path = format!("/operations?device={}&since={since}", url_encode(device_id));
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        if patches {
            path.push_str("&patches=1");
        }
        self.call(self.request(Method::Get, &path, None), &[200])
            .await
    }

    /// Pushes operations; conflicts are in the answer, not errors.
    pub async fn push_operations(
        &self,
        device_id: &str,
        operations: &[Operation],
    ) -> Result<PushResponse, HttpError> {
        let body = serde_json::to_vec(&PushRequest {
            device_id: device_id.to_owned(),
            operations: operations.to_vec(),
        })
        .map_err(|e| HttpError::Encode(e.to_string()))?;
        self.call(
            self.request(Method::Post, "/operations", Some(body)),
            &[200, 201],
        )
        .await
    }

    /// The server's current sequence number.
    pub async fn server_version(&self, device_id: &str) -> Result<u64, HttpError> {
        let path = format!("/version?device={}", url_encode(device_id));
        let answer: VersionResponse = self
            .call(self.request(Method::Get, &path, None), &[200])
            .await?;
        Ok(answer.version)
    }
}

/// Decodes a JSON body.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::EmptyBody);
    }
    serde_json::from_slice(body).map_err(|e| HttpError::InvalidJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_matches_the_old_transport() {
        assert_eq!(url_encode("device-123"), "device-123");
        assert_eq!(url_encode("hello world"), "hello+world");
        assert_eq!(url_encode("test@example.com"), "test%40example.com");
        assert_eq!(url_encode("a\nb"), "a%0D%0Ab");
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        let base = Duration::from_millis(100);
        for retry in 1..=4 {
            let d = backoff(base, retry);
            let full = base * (1 << (retry - 1));
            assert!(d >= full / 2 && d < full, "{retry}: {d:?}");
        }
    }

    #[test]
    fn error_messages_prefer_the_json_error_field() {
        assert_eq!(
            error_message(401, br#"{"error":"invalid API key"}"#),
            "invalid API key"
        );
        assert_eq!(error_message(502, b"bad gateway"), "bad gateway");
        assert_eq!(error_message(503, b""), "Service Unavailable");
    }

    #[test]
    fn retry_after_is_capped() {
        let h = |v: &str| vec![("retry-after".to_owned(), v.to_owned())];
        assert_eq!(retry_after(&h("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&h("3600")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&h("soon")), None);
    }
}
