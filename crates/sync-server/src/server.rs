//! Running the server: bind, serve HTTP (optionally over TLS), shut down gracefully.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::blobs::BlobStore;
use crate::config::Settings;
use crate::routes;
use crate::state::AppState;
use crate::store::Storage;
use crate::tls::{self, TlsError, TlsListener};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot use the blob directory {path}: {source}")]
    BlobDir {
        path: String,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How often unfinished blob uploads are checked for expiry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

pub struct ServeOptions {
    pub listen: String,
    /// Certificate chain and private key (PEM) to serve HTTPS/WSS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub base_path: String,
    pub settings: Settings,
    /// After SIGINT/SIGTERM, how long in-flight requests and WebSocket sessions get to finish.
    pub shutdown_grace: Duration,
}

/// Serves until SIGINT or SIGTERM. Prints `listening on http(s)://ADDR` as the
/// first line of stdout once the port is bound (port 0 picks a free one).
pub async fn serve<S: Storage>(store: S, options: ServeOptions) -> Result<(), ServeError> {
    let tls_config = match &options.tls {
        Some((cert, key)) => Some(tls::load_config(cert, key)?),
        None => None,
    };
    let listener = TcpListener::bind(&options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: options.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr()?;
    let state = AppState::new(store, options.settings);
    if let Some(blobs) = &state.blobs {
        blobs
            .prepare()
            .await
            .map_err(|source| ServeError::BlobDir {
                path: blobs.root().display().to_string(),
                source,
            })?;
        sweep_uploads(Arc::clone(blobs));
    }
    let app = routes::router(Arc::clone(&state), &options.base_path);
    forward_remote_pushes(&state);

    let scheme = if tls_config.is_some() {
        "https"
    } else {
        "http"
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {scheme}://{addr}")?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!(%addr, tls = tls_config.is_some(), "whisker-sync-server started");

    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        shutdown.cancel();
    });

    let stopping = state.shutdown.clone().cancelled_owned();
    let serving = async {
        match tls_config {
            Some(config) => {
                axum::serve(TlsListener::new(listener, config)?, app)
                    .with_graceful_shutdown(stopping)
                    .await
            }
            None => {
                let listener = listener.tap_io(|tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopping)
                    .await
            }
        }
    };
    let grace = options.shutdown_grace;
    let deadline = async {
        state.shutdown.cancelled().await;
        Instant::now() + grace
    };
    tokio::pin!(serving, deadline);
    let deadline = tokio::select! {
        result = &mut serving => {
            result?;
            Instant::now() + grace
        }
        deadline = &mut deadline => {
            // Signalled: keep serving in-flight requests until they finish or time runs out.
            tokio::select! {
                result = &mut serving => result?,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("grace period over; dropping unfinished requests");
                }
            }
            deadline
        }
    };
    state.sessions.close();
    if tokio::time::timeout_at(deadline, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; dropping unfinished WebSocket sessions");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Relays pushes made through other server processes (shared PostgreSQL) to
/// this process's WebSocket clients.
fn forward_remote_pushes<S: Storage>(state: &Arc<AppState<S>>) {
    let Some(mut notices) = state.store.remote_pushes() else {
        return;
    };
    let state = Arc::clone(state);
    tokio::spawn(async move {
        while let Some(notice) = notices.recv().await {
            if let Err(e) = state
                .forward_remote_push(notice.ns, notice.from, notice.to, &notice.device)
                .await
            {
                tracing::warn!(error = %e, "could not forward another server's push");
            }
        }
    });
}

/// Deletes expired blob uploads now and every [`SWEEP_INTERVAL`].
fn sweep_uploads(blobs: Arc<BlobStore>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            ticks.tick().await;
            match blobs.sweep_uploads().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "deleted expired blob uploads"),
                Err(e) => tracing::warn!(error = %e, "could not sweep blob uploads"),
            }
        }
    });
}

async fn wait_for_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
