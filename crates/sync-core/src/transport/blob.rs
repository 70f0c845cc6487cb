//! Client of the server's blob API (docs/PROTOCOL.md, "Blobs"): large assets
//! addressed by their SHA-256, uploaded in chunks and downloaded as a stream,
//! both resumable and both with bounded memory.
//!
//! - **Upload** ([`BlobClient::upload_file`], [`BlobClient::upload_bytes`]):
//!   hash the content, ask the server what it already has
//!   (`GET /blobs/<sha256>/status`), then `PUT` the missing bytes in chunks
//!   of `chunk_bytes` from where the server stopped. Content the namespace
//!   already holds is not sent at all. After a failed chunk (network error,
//!   5xx, 429) the client waits (backoff as for other requests), asks for the
//!   status again and goes on from the bytes the server kept; after
//!   `max_retries` failures in a row it gives up, and the next call resumes.
//!   A chunk is gzip-compressed when the server accepts gzip and the chunk's
//!   first 64 KiB shrink by 10% or more; media that is already compressed is
//!   sent as it is. Memory: one chunk (plus its compressed copy).
//! - **Download** ([`BlobClient::download_to_file`]): stream
//!   `GET /blobs/<sha256>` into `<dest>.part`, then check the SHA-256 and
//!   rename it to `dest`. An interrupted download keeps `<dest>.part`; the
//!   next attempt (in the same call, or a later one) asks only for the rest
//!   with `Range: bytes=<have>-`. Memory: one network read (decoded in 8 KiB
//!   slices when the server compressed the stream).
//!
//! Each request gets `timeout` from the [`HttpConfig`] (a chunk upload in
//! full; a download between two reads).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::write::GzDecoder;
use reqwest::header::{
    HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_RANGE, CONTENT_TYPE,
    RANGE, USER_AGENT,
};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::time::timeout;

use super::compression::{self, looks_compressible, GZIP};
use super::http::{
    backoff, error_message, network_error, HttpClient, HttpConfig, HttpError, Method, Request,
};
use crate::value::Value;

/// Default upload chunk: 4 MiB (the server accepts up to 8 MiB by default).
pub const DEFAULT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Prefix of asset references in stories: `"sha256:<64 hex digits>"`.
pub const REF_PREFIX: &str = "sha256:";

/// Read and hash buffer for local files.
const FILE_BUFFER: usize = 1024 * 1024;

/// Offset corrections in a row (409 answers) before an upload gives up.
const MAX_STALLS: u32 = 16;

/// Decoded bytes produced per step from a compressed download.
const DECODE_SLICE: usize = 8 * 1024;

#[derive(Debug, Error)]
pub enum BlobError {
    #[error("{0:?} is not a SHA-256 (64 hex digits, optionally prefixed with sha256:)")]
    BadHash(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("asset {0} is not on the server")]
    NotFound(String),
    #[error("the server does not store assets (HTTP {status}: {message})")]
    Unsupported { status: u16, message: String },
    #[error("the server refused the asset (HTTP {status}: {message})")]
    Refused { status: u16, message: String },
    #[error("downloaded data does not match sha256:{expected} (got sha256:{actual}); the partial file was removed")]
    HashMismatch { expected: String, actual: String },
    #[error("downloaded data is longer than the {size} bytes the server announced; the partial file was removed")]
    TooLong { size: u64 },
    #[error("invalid answer from the server: {0}")]
    InvalidAnswer(String),
    #[error("{source} (gave up after {attempts} attempts with {done} of {size} bytes transferred; the next try resumes)")]
    GaveUp {
        attempts: u32,
        done: u64,
        size: u64,
        #[source]
        source: Box<BlobError>,
    },
}

impl BlobError {
    /// Failures another attempt may get past.
    fn is_transient(&self) -> bool {
        match self {
            BlobError::Http(e) => {
                e.is_transient() || e.status().is_some_and(|s| s >= 500 || s == 429)
            }
            BlobError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// What the server holds of a blob, for this namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobStatus {
    pub sha256: String,
    /// Size of the blob, once known (complete, or announced by an upload in progress).
    pub size: Option<u64>,
    /// Bytes of an upload in progress the server kept (the full size when complete).
    pub received: u64,
    pub complete: bool,
}

/// What an upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    pub sha256: String,
    pub size: u64,
    /// The namespace already had it: nothing was sent.
    pub skipped: bool,
    /// Bytes the server already had from an earlier, interrupted upload.
    pub resumed_from: u64,
    /// Chunk bytes put on the wire (after compression).
    pub sent: u64,
}

/// What a download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReport {
    pub sha256: String,
    pub size: u64,
    /// Bytes already in `<dest>.part` from an earlier, interrupted download.
    pub resumed_from: u64,
    /// Bytes received on the wire (compressed size when compressed).
    pub received: u64,
}

/// The lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 (hex) and size of a file, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> Result<(String, u64), BlobError> {
    let read_error = |source| BlobError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; FILE_BUFFER];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            return Ok((hex(&hasher.finalize()), size));
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
}

/// Normalises `sha256:<hex>` or `<hex>` (any case) to lower-case hex.
pub fn parse_hash(text: &str) -> Result<String, BlobError> {
    let hexpart = text.strip_prefix(REF_PREFIX).unwrap_or(text);
    if hexpart.len() == 64 && hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hexpart.to_ascii_lowercase())
    } else {
        Err(BlobError::BadHash(text.to_owned()))
    }
}

/// Where upload bytes come from.
enum Source<'a> {
    File(PathBuf),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    fn name(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Bytes(_) => "data".to_owned(),
        }
    }

    /// Reads `len` bytes at `offset` into `buffer` (replacing its content).
    async fn read_at(
        &self,
        offset: u64,
        len: usize,
        buffer: &mut Vec<u8>,
    ) -> Result<(), BlobError> {
        buffer.clear();
        match self {
            Source::Bytes(data) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = start.saturating_add(len).min(data.len());
                buffer.extend_from_slice(&data[start..end]);
                Ok(())
            }
            Source::File(path) => {
                let read_error = |source| BlobError::Read {
                    path: path.display().to_string(),
                    source,
                };
                let mut file = tokio::fs::File::open(path).await.map_err(read_error)?;
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(read_error)?;
                buffer.resize(len, 0);
                file.read_exact(buffer).await.map_err(read_error)?;
                Ok(())
            }
        }
    }
}

/// The blob calls of one server and key.
#[derive(Clone)]
pub struct BlobClient {
    config: HttpConfig,
    client: HttpClient,
    chunk_bytes: usize,
}

impl BlobClient {
    /// A client sharing `client`'s connections, counters and compression
    /// knowledge; `chunk_bytes` of 0 means [`DEFAULT_CHUNK_BYTES`].
    pub fn new(config: HttpConfig, client: HttpClient, chunk_bytes: usize) -> Self {
        let chunk_bytes = if chunk_bytes == 0 {
            DEFAULT_CHUNK_BYTES
        } else {
            chunk_bytes
        };
        BlobClient {
            config,
            client,
            chunk_bytes,
        }
    }

    fn url(&self, sha: &str, rest: &str) -> String {
        format!("{}/blobs/{sha}{rest}", self.config.base_url)
    }

    fn headers(&self) -> Vec<(String, String)> {
        vec![
            (USER_AGENT.to_string(), self.config.user_agent.clone()),
            (
                AUTHORIZATION.to_string(),
                format!("Bearer {}", self.config.api_key),
            ),
        ]
    }

    /// What the server holds of `sha256` (hex or `sha256:` reference).
    pub async fn status(&self, sha256: &str) -> Result<BlobStatus, BlobError> {
        let sha = parse_hash(sha256)?;
        let request = Request {
            method: Method::Get,
            url: self.url(&sha, "/status"),
            headers: self.headers(),
            body: None,
            timeout: self.config.timeout,
            max_retries: self.config.max_retries,
            retry_delay: self.config.retry_delay,
            max_response_bytes: 64 * 1024,
        };
        let response = self.client.send(&request).await?;
        match response.status {
            200 => parse_status(&sha, &response.body),
            404 | 405 | 501 => Err(BlobError::Unsupported {
                status: response.status,
                message: error_message(response.status, &response.body),
            }),
            status => Err(HttpError::Status {
                status,
                message: error_message(status, &response.body),
            }
            .into()),
        }
    }

    /// Uploads a file (read chunk by chunk, never whole).
    pub async fn upload_file(&self, path: &Path) -> Result<UploadReport, BlobError> {
        let owned = path.to_owned();
        let (sha, size) = tokio::task::spawn_blocking(move || sha256_file(&owned))
            .await
            .map_err(|e| BlobError::Read {
                path: path.display().to_string(),
                source: std::io::Error::other(e),
            })??;
        self.upload(&sha, size, Source::File(path.to_owned())).await
    }

    /// Uploads bytes held in memory.
    pub async fn upload_bytes(&self, data: &[u8]) -> Result<UploadReport, BlobError> {
        let sha = sha256_hex(data);
        self.upload(&sha, data.len() as u64, Source::Bytes(data))
            .await
    }

    async fn upload(
        &self,
        sha: &str,
        size: u64,
        source: Source<'_>,
    ) -> Result<UploadReport, BlobError> {
        let status = self.status(sha).await?;
        let mut report = UploadReport {
            sha256: sha.to_owned(),
            size,
            skipped: status.complete,
            resumed_from: status.received,
            sent: 0,
        };
        if status.complete {
            return Ok(report);
        }
        let mut offset = status.received.min(size);
        let mut failures = 0u32;
        let mut stalls = 0u32;
        let mut buffer = Vec::new();
        let mut gzip_refused = false;
        loop {
            let len = usize::try_from(size - offset)
                .unwrap_or(usize::MAX)
                .min(self.chunk_bytes);
            source.read_at(offset, len, &mut buffer).await?;
            let (body, gzip) = if !gzip_refused
                && self.client.server_accepts_gzip()
                && looks_compressible(&buffer)
            {
                let packed = compression::gzip_fast(&buffer).map_err(|e| BlobError::Read {
                    path: source.name(),
                    source: std::io::Error::other(e),
                })?;
                (packed, true)
            } else {
                (std::mem::take(&mut buffer), false)
            };
            let wire = body.len() as u64;
            match self.put_chunk(sha, size, offset, body, gzip).await {
                Ok(Chunk::Stored(status)) => {
                    report.sent += wire;
                    failures = 0;
                    stalls = 0;
                    if status.complete {
                        return Ok(report);
                    }
                    offset = status.received;
                }
                Ok(Chunk::Elsewhere(received)) => {
                    // Another upload of the same content is under way, or an
                    // earlier answer was lost; bounded in case it never settles.
                    stalls += 1;
                    if stalls > MAX_STALLS {
                        return Err(BlobError::InvalidAnswer(format!(
                            "the server keeps moving the upload of {REF_PREFIX}{sha} (now at byte {received})"
                        )));
                    }
                    offset = received;
                }
                Ok(Chunk::GzipRefused) => gzip_refused = true,
                Err(e) if e.is_transient() => {
                    failures += 1;
                    if failures > self.config.max_retries {
                        return Err(BlobError::GaveUp {
                            attempts: failures,
                            done: offset,
                            size,
                            source: Box::new(e),
                        });
                    }
                    tokio::time::sleep(backoff(self.config.retry_delay, failures)).await;
                    match self.status(sha).await {
                        Ok(status) if status.complete => return Ok(report),
                        Ok(status) => offset = status.received.min(size),
                        Err(e) if e.is_transient() => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One `PUT /blobs/<sha>?size=&offset=` attempt.
    async fn put_chunk(
        &self,
        sha: &str,
        size: u64,
        offset: u64,
        body: Vec<u8>,
        gzip: bool,
    ) -> Result<Chunk, BlobError> {
        let mut headers = self.headers();
        headers.push((
            CONTENT_TYPE.to_string(),
            "application/octet-stream".to_owned(),
        ));
        if gzip {
            headers.push((CONTENT_ENCODING.to_string(), GZIP.to_owned()));
        }
        let request = Request {
            method: Method::Put,
            url: self.url(sha, &format!("?size={size}&offset={offset}")),
            headers,
            body: Some(body),
            timeout: self.config.timeout,
            max_retries: 0,
            retry_delay: self.config.retry_delay,
            max_response_bytes: 64 * 1024,
        };
        let response = self.client.send(&request).await?;
        match response.status {
            200 | 201 => Ok(Chunk::Stored(parse_status(sha, &response.body)?)),
            // Someone (an earlier attempt whose answer was lost) moved on.
            409 => match parse_status(sha, &response.body) {
                Ok(status) if status.size.is_none_or(|s| s == size) => {
                    Ok(Chunk::Elsewhere(status.received))
                }
                _ => Err(BlobError::Refused {
                    status: 409,
                    message: error_message(409, &response.body),
                }),
            },
            415 if gzip => {
                self.client.refuse_gzip();
                Ok(Chunk::GzipRefused)
            }
            404 | 405 | 501 => Err(BlobError::Unsupported {
                status: response.status,
                message: error_message(response.status, &response.body),
            }),
            status => Err(BlobError::Refused {
                status,
                message: error_message(status, &response.body),
            }),
        }
    }

    /// Downloads `sha256` into `dest`, resuming from `<dest>.part`.
    pub async fn download_to_file(
        &self,
        sha256: &str,
        dest: &Path,
    ) -> Result<DownloadReport, BlobError> {
        let sha = parse_hash(sha256)?;
        let status = self.status(&sha).await?;
        let size = match status {
            BlobStatus {
                complete: true,
                size: Some(size),
                ..
            } => size,
            _ => return Err(BlobError::NotFound(format!("{REF_PREFIX}{sha}"))),
        };
        let mut part = PartFile::open(dest, &sha, size).await?;
        let mut report = DownloadReport {
            sha256: sha.clone(),
            size,
            resumed_from: part.len,
            received: 0,
        };
        let mut failures = 0u32;
        while part.len < size {
            let before = part.len;
            match self.download_rest(&sha, &mut part, &mut report).await {
                Ok(()) if part.len > before => failures = 0,
                Ok(()) => {
                    // The answer ended early without an error: try again, a few times.
                    failures += 1;
                    if failures > self.config.max_retries {
                        return Err(BlobError::InvalidAnswer(format!(
                            "the server stopped sending {REF_PREFIX}{sha} at byte {}",
                            part.len
                        )));
                    }
                }
                Err(e) if e.is_transient() => {
                    failures += 1;
                    if failures > self.config.max_retries {
                        return Err(BlobError::GaveUp {
                            attempts: failures,
                            done: part.len,
                            size,
                            source: Box::new(e),
                        });
                    }
                    tokio::time::sleep(backoff(self.config.retry_delay, failures)).await;
                }
                Err(e) => return Err(e),
            }
        }
        part.finish(dest).await?;
        Ok(report)
    }

    /// One `GET` of the bytes `part` is missing, appended as they arrive.
    async fn download_rest(
        &self,
        sha: &str,
        part: &mut PartFile,
        report: &mut DownloadReport,
    ) -> Result<(), BlobError> {
        let url = self.url(sha, "");
        let limit = self.config.timeout;
        let mut request = self.client.reqwest().get(&url);
        for (name, value) in self.headers() {
            request = request.header(name, value);
        }
        if part.len > 0 {
            request = request.header(RANGE, format!("bytes={}-", part.len));
        } else if self.client.compresses() {
            request = request.header(ACCEPT_ENCODING, HeaderValue::from_static(GZIP));
        }
        let network = |e| BlobError::Http(network_error(&url, limit, e));
        let mut response = match timeout(limit, request.send()).await {
            Err(_) => return Err(timed_out(&url, limit)),
            Ok(result) => result.map_err(network)?,
        };
        self.client.learn(response.headers());
        let status = response.status().as_u16();
        match status {
            200 => part.restart().await?,
            206 => {
                let start = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(range_start);
                if start != Some(part.len) {
                    return Err(BlobError::InvalidAnswer(format!(
                        "asked for bytes from {}, got {:?}",
                        part.len,
                        response.headers().get(CONTENT_RANGE)
                    )));
                }
            }
            404 => return Err(BlobError::NotFound(format!("{REF_PREFIX}{sha}"))),
            416 => {
                // The partial file is longer than the blob: start over.
                part.restart().await?;
                return Ok(());
            }
            _ => {
                let body = response.bytes().await.unwrap_or_default();
                return Err(HttpError::Status {
                    status,
                    message: error_message(status, &body),
                }
                .into());
            }
        }
        let gzipped = response
            .headers()
            .get(CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(GZIP.as_bytes()));
        let mut decoder = gzipped.then(|| GzDecoder::new(Vec::with_capacity(DECODE_SLICE * 4)));
        let outcome = loop {
            let chunk = match timeout(limit, response.chunk()).await {
                Err(_) => break Err(timed_out(&url, limit)),
                Ok(Err(e)) => break Err(network(e)),
                Ok(Ok(None)) => break Ok(()),
                Ok(Ok(Some(chunk))) => chunk,
            };
            self.client.count(0, chunk.len());
            report.received += chunk.len() as u64;
            let written = match &mut decoder {
                None => part.append(&chunk).await,
                Some(decoder) => {
                    let mut result = Ok(());
                    for slice in chunk.chunks(DECODE_SLICE) {
                        result = decode_into(decoder, slice, part).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    result
                }
            };
            if let Err(e) = written {
                break Err(e);
            }
        };
        if let (Ok(()), Some(decoder)) = (&outcome, &mut decoder) {
            decoder.try_finish().map_err(|e| decode_error(&url, e))?;
            let rest = std::mem::take(decoder.get_mut());
            part.append(&rest).await?;
        }
        part.flush().await?;
        outcome
    }
}

/// Feeds compressed bytes to the decoder and appends what comes out.
async fn decode_into(
    decoder: &mut GzDecoder<Vec<u8>>,
    slice: &[u8],
    part: &mut PartFile,
) -> Result<(), BlobError> {
    std::io::Write::write_all(decoder, slice).map_err(|e| decode_error(&part.name(), e))?;
    let out = std::mem::take(decoder.get_mut());
    part.append(&out).await
}

fn decode_error(url: &str, e: std::io::Error) -> BlobError {
    BlobError::Http(HttpError::Decode {
        url: url.to_owned(),
        source: compression::CompressionError::Corrupt(e),
    })
}

fn timed_out(url: &str, after: Duration) -> BlobError {
    BlobError::Http(HttpError::Timeout {
        url: url.to_owned(),
        after,
    })
}

/// The first byte position of a `Content-Range: bytes <start>-<end>/<size>`.
fn range_start(value: &str) -> Option<u64> {
    value
        .strip_prefix("bytes ")?
        .split_once('-')?
        .0
        .trim()
        .parse()
        .ok()
}

/// What one chunk `PUT` led to.
enum Chunk {
    Stored(BlobStatus),
    /// The server has a different number of bytes than the chunk assumed.
    Elsewhere(u64),
    /// The server does not take gzip after all: send the chunk again, plain.
    GzipRefused,
}

fn parse_status(sha: &str, body: &[u8]) -> Result<BlobStatus, BlobError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| BlobError::InvalidAnswer(format!("blob status: {e}")))?;
    let number = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_i64)
            .and_then(|n| u64::try_from(n).ok())
    };
    let received = number("received")
        .ok_or_else(|| BlobError::InvalidAnswer("blob status without `received`".to_owned()))?;
    Ok(BlobStatus {
        sha256: sha.to_owned(),
        size: number("size"),
        received,
        complete: matches!(value.get("complete"), Some(Value::Bool(true))),
    })
}

/// `<dest>.part`: the bytes downloaded so far, and their running hash.
struct PartFile {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    len: u64,
    size: u64,
    sha: String,
}

impl PartFile {
    /// Opens (or creates) `<dest>.part`, hashing what it already holds.
    async fn open(dest: &Path, sha: &str, size: u64) -> Result<Self, BlobError> {
        let mut name = dest.as_os_str().to_owned();
        name.push(".part");
        let path = PathBuf::from(name);
        let write_error = |source| BlobError::Write {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(write_error)?;
        }
        let existing = path.clone();
        let (hasher, len) = tokio::task::spawn_blocking(move || hash_prefix(&existing))
            .await
            .map_err(|e| write_error(std::io::Error::other(e)))?
            .map_err(write_error)?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(write_error)?;
        let mut part = PartFile {
            path,
            file,
            hasher,
            len,
            size,
            sha: sha.to_owned(),
        };
        if len > size {
            part.restart().await?;
        }
        Ok(part)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn write_error(&self, source: std::io::Error) -> BlobError {
        BlobError::Write {
            path: self.name(),
            source,
        }
    }

    async fn append(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.len + bytes.len() as u64 > self.size {
            let size = self.size;
            self.remove().await;
            return Err(BlobError::TooLong { size });
        }
        self.file
            .write_all(bytes)
            .await
            .map_err(|e| self.write_error(e))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), BlobError> {
        self.file.flush().await.map_err(|e| self.write_error(e))
    }

    /// Empties the file (the server sent the whole blob, or the file was too long).
    async fn restart(&mut self) -> Result<(), BlobError> {
        self.file.flush().await.map_err(|e| self.write_error(e))?;
        self.file
            .set_len(0)
            .await
            .map_err(|e| self.write_error(e))?;
        self.hasher = Sha256::new();
        self.len = 0;
        Ok(())
    }

    async fn remove(&mut self) {
        let _ = self.file.flush().await;
        let _ = tokio::fs::remove_file(&self.path).await;
    }

    /// Checks the hash, syncs, and renames the file to `dest`.
    async fn finish(mut self, dest: &Path) -> Result<(), BlobError> {
        let actual = hex(&std::mem::take(&mut self.hasher).finalize());
        if actual != self.sha {
            self.remove().await;
            return Err(BlobError::HashMismatch {
                expected: self.sha.clone(),
                actual,
            });
        }
        self.file.flush().await.map_err(|e| self.write_error(e))?;
        self.file
            .sync_all()
            .await
            .map_err(|e| self.write_error(e))?;
        tokio::fs::rename(&self.path, dest)
            .await
            .map_err(|source| BlobError::Write {
                path: dest.display().to_string(),
                source,
            })
    }
}

/// The running hash and length of an existing partial file (empty if none).
fn hash_prefix(path: &Path) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(e),
    };
    let mut buffer = vec![0; FILE_BUFFER];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((hasher, len));
        }
        hasher.update(&buffer[..n]);
        len += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let upper = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(parse_hash(upper).unwrap(), sha256_hex(b"abc"));
        assert_eq!(
            parse_hash(&format!("sha256:{}", sha256_hex(b"abc"))).unwrap(),
            sha256_hex(b"abc")
        );
        assert!(parse_hash("sha256:abc").is_err());
        assert!(parse_hash(&"g".repeat(64)).is_err());
    }

    #[test]
    fn file_hash_matches_memory_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("asset.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            (sha256_hex(&data), data.len() as u64)
        );
        let (hasher, len) = hash_prefix(&path).unwrap();
        assert_eq!(
            (hex(&hasher.finalize()), len),
            (sha256_hex(&data), 3_000_000)
        );
        assert_eq!(hash_prefix(&dir.path().join("none")).unwrap().1, 0);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_start("bytes */200"), None);
        assert_eq!(range_start("items 1-2/3"), None);
    }
}
