//! Content-addressed storage of large assets (blobs), on disk, with a
//! per-namespace index. The HTTP side is in [`routes`]; the wire format in
//! docs/PROTOCOL.md ("Blobs").
//!
//! Layout under the blob directory:
//!
//! ```text
//! objects/<first 2 hex digits>/<sha256>   the content, named by its SHA-256 (stored once)
//! namespaces/<ns>/<sha256>                empty marker: namespace <ns> holds that blob
//! uploads/<ns>/<sha256>.part              an upload in progress: the bytes received so far
//! uploads/<ns>/<sha256>.size              its announced size, in decimal
//! ```
//!
//! A namespace sees only blobs it has uploaded in full itself (its markers),
//! so the store never reveals whether *another* namespace holds some
//! content; identical content uploaded by several namespaces, or several
//! times, is still kept once in `objects/`. Chunks are appended in order
//! (`offset` must equal the bytes received) and synced to disk before they
//! are acknowledged; when the last byte arrives the upload is hashed and,
//! if it matches its name, moved into `objects/`. An upload untouched for
//! the expiry time is deleted by [`BlobStore::sweep_uploads`].

pub mod routes;

use std::fmt;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::config::BlobSettings;
use crate::store::NamespaceId;

/// Locks serialising work on one (namespace, blob) pair; pairs share a
/// stripe by hash, which only ever makes unrelated uploads wait briefly.
const LOCK_STRIPES: usize = 64;

/// Read buffer for hashing a finished upload.
const HASH_BUFFER: usize = 1024 * 1024;

/// A blob's name: the SHA-256 of its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobId([u8; 32]);

impl BlobId {
    /// Parses 64 hex digits (either case).
    pub fn parse(text: &str) -> Option<BlobId> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let digits = std::str::from_utf8(pair).ok()?;
            bytes[i] = u8::from_str_radix(digits, 16).ok()?;
        }
        Some(BlobId(bytes))
    }

    /// Lower-case hex, as used in paths and answers.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// What a namespace holds of a blob; the JSON of `/blobs/<sha256>/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobStatus {
    pub sha256: String,
    /// The blob's size once known: complete, or announced by an upload in progress.
    pub size: Option<u64>,
    /// Bytes received so far (the size, when complete).
    pub received: u64,
    pub complete: bool,
}

#[derive(Debug, Error)]
pub enum BlobError {
    #[error("this server stores no assets (start it with --blob-dir)")]
    Disabled,
    #[error("{0:?} is not a SHA-256 (64 hex digits)")]
    BadId(String),
    #[error("{0}")]
    BadQuery(String),
    #[error("a blob of {size} bytes is larger than the {limit}-byte limit")]
    TooLarge { size: u64, limit: u64 },
    #[error("chunk larger than the {limit}-byte limit")]
    ChunkTooLarge { limit: u64, status: BlobStatus },
    #[error("the upload in progress announced {} bytes, not {size}", status.size.unwrap_or(0))]
    SizeMismatch { size: u64, status: BlobStatus },
    #[error("offset {offset} does not match the {} bytes received", status.received)]
    OffsetMismatch { offset: u64, status: BlobStatus },
    #[error("the chunk goes past the announced size of {size} bytes")]
    PastEnd { size: u64, status: BlobStatus },
    #[error("the uploaded bytes do not match sha256:{0}; upload them again")]
    HashMismatch(String),
    #[error("the request body could not be read: {detail}")]
    Body { detail: String, status: BlobStatus },
    #[error("not found")]
    NotFound,
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("blob storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl BlobError {
    /// Where the upload stands, for answers that let the client carry on.
    pub fn status(&self) -> Option<&BlobStatus> {
        match self {
            BlobError::ChunkTooLarge { status, .. }
            | BlobError::SizeMismatch { status, .. }
            | BlobError::OffsetMismatch { status, .. }
            | BlobError::PastEnd { status, .. }
            | BlobError::Body { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// The blob directory and its locks.
pub struct BlobStore {
    root: PathBuf,
    settings: BlobSettings,
    stripes: Vec<Arc<Mutex<()>>>,
}

impl BlobStore {
    pub fn new(root: PathBuf, settings: BlobSettings) -> Self {
        BlobStore {
            root,
            settings,
            stripes: (0..LOCK_STRIPES).map(|_| Arc::default()).collect(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn settings(&self) -> &BlobSettings {
        &self.settings
    }

    /// Creates the directories (at start, so a bad path fails early).
    pub async fn prepare(&self) -> std::io::Result<()> {
        for dir in ["objects", "namespaces", "uploads"] {
            tokio::fs::create_dir_all(self.root.join(dir)).await?;
        }
        Ok(())
    }

    fn object_path(&self, id: &BlobId) -> PathBuf {
        let hex = id.hex();
        self.root.join("objects").join(&hex[..2]).join(hex)
    }

    fn marker_path(&self, ns: NamespaceId, id: &BlobId) -> PathBuf {
        self.root
            .join("namespaces")
            .join(ns.to_string())
            .join(id.hex())
    }

    fn upload_dir(&self, ns: NamespaceId) -> PathBuf {
        self.root.join("uploads").join(ns.to_string())
    }

    fn part_path(&self, ns: NamespaceId, id: &BlobId) -> PathBuf {
        self.upload_dir(ns).join(format!("{}.part", id.hex()))
    }

    fn size_path(&self, ns: NamespaceId, id: &BlobId) -> PathBuf {
        self.upload_dir(ns).join(format!("{}.size", id.hex()))
    }

    fn stripe(&self, ns: NamespaceId, id: &BlobId) -> Arc<Mutex<()>> {
        let index = (id.0[0] as usize ^ ns.rem_euclid(LOCK_STRIPES as i64) as usize) % LOCK_STRIPES;
        Arc::clone(&self.stripes[index])
    }

    /// The namespace's complete copy: its size, if it holds one.
    async fn held(&self, ns: NamespaceId, id: &BlobId) -> Result<Option<u64>, BlobError> {
        if !exists(&self.marker_path(ns, id)).await? {
            return Ok(None);
        }
        match tokio::fs::metadata(self.object_path(id)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                tracing::error!(blob = %id.hex(), ns, "blob marker without content; treating it as missing");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The size an upload in progress announced, and its bytes so far.
    async fn in_progress(
        &self,
        ns: NamespaceId,
        id: &BlobId,
    ) -> Result<Option<(u64, u64)>, BlobError> {
        let announced = match tokio::fs::read_to_string(self.size_path(ns, id)).await {
            Ok(text) => text.trim().parse::<u64>().ok(),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let Some(size) = announced else {
            return Ok(None);
        };
        let received = match tokio::fs::metadata(self.part_path(ns, id)).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Some((size, received)))
    }

    async fn current(&self, ns: NamespaceId, id: &BlobId) -> Result<BlobStatus, BlobError> {
        let sha256 = id.hex();
        if let Some(size) = self.held(ns, id).await? {
            return Ok(BlobStatus {
                sha256,
                size: Some(size),
                received: size,
                complete: true,
            });
        }
        Ok(match self.in_progress(ns, id).await? {
            Some((size, received)) => BlobStatus {
                sha256,
                size: Some(size),
                received,
                complete: false,
            },
            None => BlobStatus {
                sha256,
                size: None,
                received: 0,
                complete: false,
            },
        })
    }

    /// What the namespace holds of a blob.
    pub async fn status(&self, ns: NamespaceId, id: BlobId) -> Result<BlobStatus, BlobError> {
        let stripe = self.stripe(ns, &id);
        let _guard = stripe.lock().await;
        self.current(ns, &id).await
    }

    /// Appends the chunk in `body` at `offset` of an upload of `size` bytes,
    /// and completes the blob when it was the last one. Runs as its own task,
    /// so a client that goes away mid-chunk cannot cut a write short: the
    /// bytes that arrived are kept for the resumed upload.
    pub async fn put_chunk(
        self: &Arc<Self>,
        ns: NamespaceId,
        id: BlobId,
        size: u64,
        offset: u64,
        body: Body,
    ) -> Result<BlobStatus, BlobError> {
        let limit = self.settings.max_blob_bytes;
        if size > limit {
            return Err(BlobError::TooLarge { size, limit });
        }
        let store = Arc::clone(self);
        tokio::spawn(async move { store.write_chunk(ns, id, size, offset, body).await }).await?
    }

    async fn write_chunk(
        &self,
        ns: NamespaceId,
        id: BlobId,
        size: u64,
        offset: u64,
        body: Body,
    ) -> Result<BlobStatus, BlobError> {
        let stripe = self.stripe(ns, &id);
        let _guard = stripe.lock().await;
        let status = self.current(ns, &id).await?;
        if status.complete {
            return Ok(status);
        }
        let part = self.part_path(ns, &id);
        match status.size {
            Some(announced) if announced != size => {
                return Err(BlobError::SizeMismatch { size, status });
            }
            Some(_) => {}
            None if offset == 0 => {
                tokio::fs::create_dir_all(self.upload_dir(ns)).await?;
                remove_if_present(&part).await?;
                tokio::fs::write(self.size_path(ns, &id), size.to_string()).await?;
            }
            None => {}
        }
        let received = status.received;
        let status = |received| BlobStatus {
            sha256: id.hex(),
            size: Some(size),
            received,
            complete: false,
        };
        if offset != received {
            return Err(BlobError::OffsetMismatch {
                offset,
                status: status(received),
            });
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await?;
        let max_chunk = self.settings.max_chunk_bytes;
        let mut stream = body.into_data_stream();
        let mut written = 0u64;
        let mut refused = None;
        while let Some(frame) = stream.next().await {
            let bytes = match frame {
                Ok(bytes) => bytes,
                Err(e) => {
                    refused = Some(BlobError::Body {
                        detail: e.to_string(),
                        status: status(received + written),
                    });
                    break;
                }
            };
            let len = bytes.len() as u64;
            if written + len > max_chunk {
                refused = Some(BlobError::ChunkTooLarge {
                    limit: max_chunk,
                    status: status(received),
                });
                break;
            }
            if received + written + len > size {
                refused = Some(BlobError::PastEnd {
                    size,
                    status: status(received),
                });
                break;
            }
            file.write_all(&bytes).await?;
            written += len;
        }
        file.flush().await?;
        match refused {
            // An interrupted body keeps what arrived; a refused one is undone.
            Some(e @ BlobError::Body { .. }) => {
                file.sync_data().await?;
                return Err(e);
            }
            Some(e) => {
                file.set_len(received).await?;
                file.sync_data().await?;
                return Err(e);
            }
            None => file.sync_data().await?,
        }
        drop(file);
        let now = received + written;
        if now < size {
            return Ok(status(now));
        }
        self.complete(ns, &id, &part).await?;
        Ok(BlobStatus {
            sha256: id.hex(),
            size: Some(size),
            received: size,
            complete: true,
        })
    }

    /// Checks a finished upload against its name and files it under `objects/`.
    async fn complete(&self, ns: NamespaceId, id: &BlobId, part: &Path) -> Result<(), BlobError> {
        let path = part.to_owned();
        let actual = tokio::task::spawn_blocking(move || hash_file(&path)).await??;
        if actual != id.0 {
            remove_if_present(part).await?;
            remove_if_present(&self.size_path(ns, id)).await?;
            return Err(BlobError::HashMismatch(id.hex()));
        }
        let object = self.object_path(id);
        if exists(&object).await? {
            remove_if_present(part).await?;
        } else {
            if let Some(dir) = object.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            tokio::fs::rename(part, &object).await?;
        }
        let marker = self.marker_path(ns, id);
        if let Some(dir) = marker.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::File::create(&marker).await?.sync_all().await?;
        remove_if_present(&self.size_path(ns, id)).await?;
        Ok(())
    }

    /// The content of a blob the namespace holds, and its size.
    pub async fn open(
        &self,
        ns: NamespaceId,
        id: BlobId,
    ) -> Result<(tokio::fs::File, u64), BlobError> {
        let Some(size) = self.held(ns, &id).await? else {
            return Err(BlobError::NotFound);
        };
        match tokio::fs::File::open(self.object_path(&id)).await {
            Ok(file) => Ok((file, size)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(BlobError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes uploads not written to for the expiry time; returns how many.
    pub async fn sweep_uploads(&self) -> Result<usize, BlobError> {
        let expiry = self.settings.upload_expiry;
        let mut removed = 0;
        let mut namespaces = match tokio::fs::read_dir(self.root.join("uploads")).await {
            Ok(dir) => dir,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        while let Some(ns_dir) = namespaces.next_entry().await? {
            let Some(ns) = ns_dir.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let mut entries = tokio::fs::read_dir(ns_dir.path()).await?;
            while let Some(entry) = entries.next_entry().await? {
                let name = entry.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".size"))
                    .and_then(BlobId::parse)
                else {
                    continue;
                };
                let stripe = self.stripe(ns, &id);
                let _guard = stripe.lock().await;
                let part = self.part_path(ns, &id);
                let last_write = match tokio::fs::metadata(&part).await {
                    Ok(meta) => meta.modified()?,
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        entry.metadata().await?.modified()?
                    }
                    Err(e) => return Err(e.into()),
                };
                let idle = SystemTime::now()
                    .duration_since(last_write)
                    .unwrap_or(Duration::ZERO);
                if idle >= expiry {
                    remove_if_present(&part).await?;
                    remove_if_present(&entry.path()).await?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

async fn exists(path: &Path) -> std::io::Result<bool> {
    tokio::fs::try_exists(path).await
}

async fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; HASH_BUFFER];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn store(dir: &Path, max_chunk_bytes: u64) -> Arc<BlobStore> {
        Arc::new(BlobStore::new(
            dir.to_owned(),
            BlobSettings {
                max_chunk_bytes,
                max_blob_bytes: 1000,
                ..BlobSettings::default()
            },
        ))
    }

    #[test]
    fn ids() {
        let id = BlobId::parse(ABC).unwrap();
        assert_eq!(id.hex(), ABC);
        assert_eq!(BlobId::parse(&ABC.to_uppercase()), Some(id));
        assert_eq!(BlobId::parse("abc"), None);
        assert_eq!(BlobId::parse(&"z".repeat(64)), None);
        assert_eq!(BlobId::parse(&format!("+{}", &ABC[1..])), None);
    }

    #[tokio::test]
    async fn chunks_complete_dedup_and_isolate() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = store(dir.path(), 2);
        blobs.prepare().await.unwrap();
        let id = BlobId::parse(ABC).unwrap();
        let status = blobs
            .put_chunk(1, id, 3, 0, Body::from("ab"))
            .await
            .unwrap();
        assert_eq!((status.received, status.complete), (2, false));
        let wrong = blobs
            .put_chunk(1, id, 3, 0, Body::from("ab"))
            .await
            .unwrap_err();
        assert!(matches!(wrong, BlobError::OffsetMismatch { .. }), "{wrong}");
        assert_eq!(wrong.status().map(|s| s.received), Some(2));
        let other_size = blobs
            .put_chunk(1, id, 4, 2, Body::from("c"))
            .await
            .unwrap_err();
        assert!(matches!(other_size, BlobError::SizeMismatch { .. }));
        let big = blobs
            .put_chunk(1, id, 3, 2, Body::from("cde"))
            .await
            .unwrap_err();
        assert!(matches!(big, BlobError::ChunkTooLarge { .. }));
        let past = blobs
            .put_chunk(1, id, 3, 2, Body::from("cd"))
            .await
            .unwrap_err();
        assert!(matches!(past, BlobError::PastEnd { .. }));
        let done = blobs.put_chunk(1, id, 3, 2, Body::from("c")).await.unwrap();
        assert!(done.complete);
        assert!(matches!(blobs.open(2, id).await, Err(BlobError::NotFound)));
        assert_eq!(blobs.status(2, id).await.unwrap().received, 0);
        blobs.put_chunk(2, id, 3, 0, Body::from("a")).await.unwrap();
        blobs
            .put_chunk(2, id, 3, 1, Body::from("bc"))
            .await
            .unwrap();
        assert_eq!(blobs.open(2, id).await.unwrap().1, 3);
        let objects = std::fs::read_dir(dir.path().join("objects/ba"))
            .unwrap()
            .count();
        assert_eq!(objects, 1, "identical content is stored once");
        let leftovers = std::fs::read_dir(dir.path().join("uploads/1"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0);
    }

    #[tokio::test]
    async fn wrong_content_is_refused_and_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = store(dir.path(), 100);
        let id = BlobId::parse(ABC).unwrap();
        let e = blobs
            .put_chunk(1, id, 3, 0, Body::from("abd"))
            .await
            .unwrap_err();
        assert!(matches!(e, BlobError::HashMismatch(_)), "{e}");
        assert_eq!(blobs.status(1, id).await.unwrap().size, None);
        let e = blobs
            .put_chunk(1, id, 1001, 0, Body::empty())
            .await
            .unwrap_err();
        assert!(matches!(e, BlobError::TooLarge { .. }));
    }

    #[tokio::test]
    async fn stale_uploads_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = BlobSettings {
            max_blob_bytes: 1000,
            ..BlobSettings::default()
        };
        settings.upload_expiry = Duration::ZERO;
        let blobs = Arc::new(BlobStore::new(dir.path().to_owned(), settings));
        let id = BlobId::parse(ABC).unwrap();
        blobs.put_chunk(1, id, 3, 0, Body::from("a")).await.unwrap();
        assert_eq!(blobs.sweep_uploads().await.unwrap(), 1);
        assert_eq!(blobs.status(1, id).await.unwrap().received, 0);
    }
}
