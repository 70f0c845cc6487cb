//! The tokio runtime the module's network clients run on: multi-threaded with
//! two workers, built on first use and kept for the life of the process.
//!
//! Blocking Lua calls drive futures to completion with [`block_on`];
//! background tasks (WebSocket reader, heartbeat, reconnect) are spawned on it
//! and never call into Lua.

use std::future::Future;
use std::sync::OnceLock;

use thiserror::Error;
use tokio::runtime::{Builder, Runtime};

#[derive(Debug, Clone, Error)]
pub(crate) enum RuntimeError {
    #[error("cannot start the network runtime: {0}")]
    Start(String),
    #[error("cannot wait for the network from inside an async task")]
    Nested,
}

/// The shared runtime, built on first use.
pub(crate) fn runtime() -> Result<&'static Runtime, RuntimeError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            pin_library();
            Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("whisker-sync")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| RuntimeError::Start(e.clone()))
}

/// Runs `future` to completion on the shared runtime, blocking this thread.
pub(crate) fn block_on<F: Future>(future: F) -> Result<F::Output, RuntimeError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(RuntimeError::Nested);
    }
    Ok(runtime()?.block_on(future))
}

/// Keeps this shared library mapped until the process exits. Lua unloads C
/// modules when its state closes, but the runtime's worker threads run this
/// library's code until the process ends.
fn pin_library() {
    #[cfg(unix)]
    // SAFETY: dladdr/dlopen are called with a valid address and the path they
    // return; RTLD_NOLOAD only changes the flags of an already loaded object.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let address = pin_library as *const libc::c_void;
        if libc::dladdr(address, &mut info) != 0 && !info.dli_fname.is_null() {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            );
        }
    }
}
