//! A 50 MB asset through the real reference server with bounded memory on
//! both ends: this test binary counts every heap byte it allocates (its own
//! binary, so no other test's allocations blur the peak), and the server's
//! peak resident set is read from /proc. Both must stay far below the asset's
//! size, which is what streaming in chunks promises.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sync_core::transport::blob::DEFAULT_CHUNK_BYTES;
use sync_core::transport::http::{HttpConfig, HttpTransport};

mod support;

use support::reliability::figure;
use support::{runtime, Server, KEY};

/// Counts live heap bytes and their high-water mark.
struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MIB: usize = 1024 * 1024;
const ASSET_BYTES: usize = 50 * MIB;

/// Heap growth allowed on the client: a few chunks' worth (the chunk being
/// read, its request body, the HTTP client's buffers), not the asset.
const CLIENT_BUDGET: usize = 6 * DEFAULT_CHUNK_BYTES;
/// Resident-set growth allowed on the server.
const SERVER_BUDGET_KIB: u64 = 16 * 1024;

/// Peak resident set of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status")
}

/// Writes `len` bytes that do not compress (xorshift), 1 MiB at a time, so
/// making the file does not itself raise the peak.
fn write_noise(path: &std::path::Path, len: usize) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create asset"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; MIB];
    for _ in 0..len / MIB {
        for byte in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = (x >> 24) as u8;
        }
        file.write_all(&block).expect("write asset");
    }
    file.flush().expect("flush asset");
}

#[test]
fn a_50_mb_asset_moves_with_bounded_memory_on_both_ends() {
    let server = Server::start();
    let rt = runtime();
    let work = tempfile::tempdir().expect("temp dir");
    let source = work.path().join("soundtrack.ogg");
    write_noise(&source, ASSET_BYTES);
    let dest = work.path().join("copy").join("soundtrack.ogg");

    let mut config = HttpConfig::new(server.http_url(), KEY);
    config.timeout = Duration::from_secs(60);
    let http = HttpTransport::new(config).expect("http transport");
    let blobs = http.blobs(DEFAULT_CHUNK_BYTES);

    let server_before = peak_rss_kib(server.child.id());
    let client_before = LIVE.load(Ordering::Relaxed);
    PEAK.store(client_before, Ordering::Relaxed);
    let (upload, download) = rt.block_on(async {
        let upload = blobs.upload_file(&source).await.expect("upload");
        let download = blobs
            .download_to_file(&upload.sha256, &dest)
            .await
            .expect("download");
        (upload, download)
    });
    let client_growth = PEAK.load(Ordering::Relaxed) - client_before;
    let server_growth = peak_rss_kib(server.child.id()).saturating_sub(server_before);

    assert_eq!(upload.size, ASSET_BYTES as u64);
    assert!(upload.sent >= ASSET_BYTES as u64, "{upload:?}");
    assert_eq!(download.size, ASSET_BYTES as u64);
    assert_eq!(
        std::fs::metadata(&dest).expect("downloaded file").len(),
        ASSET_BYTES as u64
    );
    // download_to_file renames the file into place only once its SHA-256
    // matches, so its existence is the content check.
    figure(&format!(
        "assets 50 MB up and down: client heap peak +{:.1} MiB, server peak RSS +{:.1} MiB",
        client_growth as f64 / MIB as f64,
        server_growth as f64 / 1024.0
    ));
    assert!(
        client_growth < CLIENT_BUDGET,
        "client heap grew by {client_growth} bytes for a {ASSET_BYTES}-byte asset"
    );
    assert!(
        server_growth < SERVER_BUDGET_KIB,
        "server peak RSS grew by {server_growth} KiB for a {ASSET_BYTES}-byte asset"
    );
}
