//! The blob routes: `GET /blobs/<sha256>/status`, `PUT /blobs/<sha256>?size=&offset=`
//! and `GET`/`HEAD /blobs/<sha256>` (with `Range`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, RANGE,
};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use sync_core::transport::compression::{lists_gzip, looks_compressible, SAMPLE_BYTES};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{BlobError, BlobId, BlobStore};
use crate::compression::Compressible;
use crate::routes::Namespace;
use crate::state::AppState;
use crate::store::Storage;
use crate::validate::whole_number;

/// Bytes read from disk per step of a download.
const READ_CHUNK: usize = 64 * 1024;

impl IntoResponse for BlobError {
    fn into_response(self) -> Response {
        let status = match &self {
            BlobError::Disabled => StatusCode::NOT_IMPLEMENTED,
            BlobError::BadId(_) | BlobError::BadQuery(_) | BlobError::PastEnd { .. } => {
                StatusCode::BAD_REQUEST
            }
            BlobError::Body { .. } => StatusCode::BAD_REQUEST,
            BlobError::TooLarge { .. } | BlobError::ChunkTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            BlobError::SizeMismatch { .. } | BlobError::OffsetMismatch { .. } => {
                StatusCode::CONFLICT
            }
            BlobError::HashMismatch(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BlobError::NotFound => StatusCode::NOT_FOUND,
            BlobError::Io(_) | BlobError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "blob storage failure");
            "storage error".to_owned()
        } else {
            self.to_string()
        };
        let mut body = json!({ "error": message });
        if let Some(progress) = self.status() {
            body["sha256"] = json!(progress.sha256);
            body["size"] = json!(progress.size);
            body["received"] = json!(progress.received);
            body["complete"] = json!(progress.complete);
        }
        (status, Json(body)).into_response()
    }
}

fn store<S>(state: &AppState<S>) -> Result<&Arc<BlobStore>, BlobError> {
    state.blobs.as_ref().ok_or(BlobError::Disabled)
}

fn blob_id(text: &str) -> Result<BlobId, BlobError> {
    BlobId::parse(text).ok_or_else(|| BlobError::BadId(text.to_owned()))
}

/// `GET /blobs/<sha256>/status`.
pub async fn status<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    Namespace(ns): Namespace,
    Path(sha): Path<String>,
) -> Response {
    let answer = async {
        let store = store(&state)?;
        store.status(ns, blob_id(&sha)?).await
    };
    match answer.await {
        Ok(status) => Json(status).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct PutParams {
    size: Option<String>,
    offset: Option<String>,
}

/// `PUT /blobs/<sha256>?size=<total>&offset=<first byte>`: one chunk.
pub async fn put<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    Namespace(ns): Namespace,
    Path(sha): Path<String>,
    params: Result<Query<PutParams>, QueryRejection>,
    body: Body,
) -> Response {
    let answer = async {
        let store = store(&state)?;
        let id = blob_id(&sha)?;
        let Query(params) = params.map_err(|e| BlobError::BadQuery(e.body_text()))?;
        let number = |name: &'static str, value: Option<String>| {
            let value = value.ok_or_else(|| {
                BlobError::BadQuery(format!("query parameter `{name}` is required"))
            })?;
            whole_number(name, &value).map_err(|e| BlobError::BadQuery(e.to_string()))
        };
        let size = number("size", params.size)?;
        let offset = number("offset", params.offset)?;
        store.put_chunk(ns, id, size, offset, body).await
    };
    match answer.await {
        Ok(status) => Json(status).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A `Range` header's one byte range within `len` bytes: `Some(Ok((first, last)))`,
/// `Some(Err(()))` when it cannot be satisfied, `None` when the whole blob
/// should be sent (no header, several ranges, or a header we do not understand).
pub fn parse_range(header: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        let suffix: u64 = last.parse().ok()?;
        if suffix == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(suffix), len - 1)
    } else {
        let first: u64 = first.parse().ok()?;
        let last = if last.is_empty() {
            u64::MAX
        } else {
            last.parse().ok()?
        };
        if last < first {
            return None;
        }
        if first >= len {
            return Some(Err(()));
        }
        (first, last.min(len - 1))
    };
    Some(Ok(range))
}

/// `GET /blobs/<sha256>` (and `HEAD`): the content, streamed from disk.
pub async fn download<S: Storage>(
    State(state): State<Arc<AppState<S>>>,
    Namespace(ns): Namespace,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Response {
    match send_blob(&state, ns, &sha, &headers).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn send_blob<S>(
    state: &AppState<S>,
    ns: crate::store::NamespaceId,
    sha: &str,
    headers: &HeaderMap,
) -> Result<Response, BlobError> {
    let store = store(state)?;
    let id = blob_id(sha)?;
    let (mut file, len) = store.open(ns, id).await?;
    let range = headers
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, len));
    let mut response = Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(ACCEPT_RANGES, "bytes")
        .header(ETAG, format!("\"{}\"", id.hex()))
        .header(CACHE_CONTROL, "private, max-age=31536000, immutable");
    let (status, first, count) = match range {
        Some(Err(())) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(CONTENT_RANGE, format!("bytes */{len}"))],
                Json(json!({ "error": format!("range outside the blob's {len} bytes") })),
            )
                .into_response());
        }
        Some(Ok((first, last))) => {
            response = response.header(CONTENT_RANGE, format!("bytes {first}-{last}/{len}"));
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        None => (StatusCode::OK, 0, len),
    };
    let wants_gzip = headers
        .get(ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(lists_gzip);
    let mut compressible = false;
    if status == StatusCode::OK && wants_gzip {
        let mut sample = vec![0; SAMPLE_BYTES.min(usize::try_from(len).unwrap_or(usize::MAX))];
        file.read_exact(&mut sample).await?;
        compressible = looks_compressible(&sample);
    }
    file.seek(std::io::SeekFrom::Start(first)).await?;
    let stream = ReaderStream::with_capacity(file.take(count), READ_CHUNK);
    let mut response = response
        .status(status)
        .header(CONTENT_LENGTH, count)
        .body(Body::from_stream(stream))
        .map_err(|e| BlobError::Io(std::io::Error::other(e)))?;
    if compressible {
        response.extensions_mut().insert(Compressible);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=90-1000", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-1000", 100), Some(Ok((0, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=-0", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("bytes=9-1", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=x-", 100), None);
    }
}
