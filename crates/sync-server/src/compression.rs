//! Negotiated gzip on the HTTP API (docs/PROTOCOL.md, "Compression").
//!
//! - Requests: a body with `Content-Encoding: gzip` is decoded before the
//!   handlers see it (size limits apply to the decoded bytes); any other
//!   coding is refused with 415. Every answer carries `Accept-Encoding: gzip`
//!   (RFC 7694), which is how clients learn they may compress.
//! - Answers: JSON of 1 KiB or more is gzip-compressed (default level) when
//!   the request's `Accept-Encoding` lists gzip; a whole-blob download
//!   ([`Compressible`]) at the fastest level. Clients that send no
//!   `Accept-Encoding`, such as the old Lua transport, get plain bodies.

use axum::http::header::{ACCEPT_ENCODING, CONTENT_TYPE};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sync_core::transport::compression::{GZIP, MIN_COMPRESS_BYTES};
use tower_http::compression::predicate::{Predicate, SizeAbove};
use tower_http::compression::{CompressionLayer, CompressionLevel};
use tower_http::decompression::RequestDecompressionLayer;

/// Marks a response whose body compresses well (set by blob downloads
/// after sniffing the content).
#[derive(Debug, Clone, Copy)]
pub struct Compressible;

const MIN_SIZE: u16 = MIN_COMPRESS_BYTES as u16;

fn is_json(_: StatusCode, _: Version, headers: &HeaderMap, _: &Extensions) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"))
}

fn is_compressible(_: StatusCode, _: Version, _: &HeaderMap, extensions: &Extensions) -> bool {
    extensions.get::<Compressible>().is_some()
}

/// gzip for JSON answers.
pub fn json_answers() -> CompressionLayer<impl Predicate> {
    CompressionLayer::new().compress_when(SizeAbove::new(MIN_SIZE).and(is_json))
}

/// gzip, fastest level, for blob downloads marked [`Compressible`].
pub fn blob_answers() -> CompressionLayer<impl Predicate> {
    CompressionLayer::new()
        .quality(CompressionLevel::Fastest)
        .compress_when(SizeAbove::new(MIN_SIZE).and(is_compressible))
}

/// Decodes gzip request bodies; 415 for other codings.
pub fn requests() -> RequestDecompressionLayer {
    RequestDecompressionLayer::new()
}

/// Adds `Accept-Encoding: gzip` to an answer (the server takes gzip bodies),
/// and gives the decompression layer's bare 415 the usual JSON error body.
pub async fn advertise(response: Response) -> Response {
    let mut response = if response.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE
        && !response.headers().contains_key(CONTENT_TYPE)
    {
        let body = Json(json!({ "error": "unsupported Content-Encoding (use gzip or none)" }));
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, body).into_response()
    } else {
        response
    };
    response
        .headers_mut()
        .entry(ACCEPT_ENCODING)
        .or_insert(HeaderValue::from_static(GZIP));
    response
}
