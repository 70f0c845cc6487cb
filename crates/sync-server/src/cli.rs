//! The `whisker-sync-server` command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sync_core::protocol::now_seconds;
use thiserror::Error;

use crate::config::{parse_duration, parse_origin, BlobSettings, Limits, Settings};
use crate::keys::{self, KeyError};
use crate::server::{self, ServeError, ServeOptions};
use crate::store::{KeyRecord, PostgresStore, SqliteDurability, SqliteStore, Storage, StoreError};

#[derive(Debug, Parser)]
#[command(
    name = "whisker-sync-server",
    version,
    about = "The whisker-sync reference server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sync server (HTTP and WebSocket).
    Serve(Box<ServeArgs>),
    /// Manage API keys. Each key is a separate namespace of stories.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// SQLite database file, created if missing.
    #[arg(long, env = "WHISKER_SYNC_DB", default_value = "whisker-sync.db")]
    pub db: PathBuf,
    /// PostgreSQL URL (postgres://user:password@host:port/dbname); used instead of --db.
    #[arg(long, env = "WHISKER_SYNC_DATABASE_URL")]
    pub database_url: Option<String>,
    /// SQLite durability: `full` syncs every commit to disk, `normal` only at checkpoints.
    #[arg(long, value_enum, default_value_t = SqliteDurability::Full)]
    pub sqlite_sync: SqliteDurability,
    /// PostgreSQL connections per server process.
    #[arg(long, default_value_t = 16)]
    pub pg_pool_size: usize,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// TLS certificate chain (PEM). Serves HTTPS and WSS with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve the API under this path prefix (e.g. `/sync`) instead of the root.
    #[arg(long, default_value = "")]
    pub base_path: String,
    /// How long deletions are still sent to new devices (500ms, 10s, 5m, 2h, 30d).
    #[arg(long, value_parser = parse_duration, default_value = "30d")]
    pub tombstone_retention: Duration,
    /// Largest request body or WebSocket message, in bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    #[arg(long, default_value_t = 1000)]
    pub max_ops_per_push: usize,
    /// Deepest JSON nesting accepted, counting the request's outer object.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(4..=120))]
    pub max_json_depth: u16,
    #[arg(long, default_value_t = 256)]
    pub max_story_id_bytes: usize,
    /// Largest page served when a client sends `limit`.
    #[arg(long, default_value_t = 1000)]
    pub max_page_size: usize,
    /// A WebSocket must send its auth message within this time.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub ws_auth_timeout: Duration,
    /// How often the server pings each WebSocket.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ws_ping_interval: Duration,
    /// Close a WebSocket that sends nothing (not even a pong) for this long.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub ws_idle_timeout: Duration,
    /// Let web pages from this origin call the API (CORS); repeat for several, `*` for any.
    #[arg(long = "cors-origin", value_parser = parse_origin)]
    pub cors_origins: Vec<String>,
    /// On SIGINT/SIGTERM, time allowed for in-flight requests to finish.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// Directory for large assets (blobs). Default: `<db name>-blobs` next to
    /// the SQLite file; with PostgreSQL, assets are off unless this is set.
    #[arg(long, env = "WHISKER_SYNC_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,
    /// Largest asset accepted, in bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub max_blob_bytes: u64,
    /// Largest chunk in one asset upload request, in bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_blob_chunk_bytes: u64,
    /// Delete asset uploads left unfinished this long.
    #[arg(long, value_parser = parse_duration, default_value = "7d")]
    pub blob_upload_expiry: Duration,
}

/// `<dir>/<stem>-blobs` for the SQLite file `<dir>/<stem>.<ext>`.
fn default_blob_dir(db: &Path) -> PathBuf {
    let stem = db
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("whisker-sync");
    db.with_file_name(format!("{stem}-blobs"))
}

impl ServeArgs {
    fn settings(&self) -> Settings {
        Settings {
            limits: Limits {
                max_body_bytes: self.max_body_bytes,
                max_operations_per_push: self.max_ops_per_push,
                max_json_depth: usize::from(self.max_json_depth),
                max_story_id_bytes: self.max_story_id_bytes,
                max_page_size: self.max_page_size.max(1),
                ..Limits::default()
            },
            tombstone_retention: self.tombstone_retention,
            ws_auth_timeout: self.ws_auth_timeout,
            ws_ping_interval: self.ws_ping_interval,
            ws_idle_timeout: self.ws_idle_timeout,
            cors_origins: self.cors_origins.clone(),
            blobs: BlobSettings {
                dir: self.blob_dir.clone().or_else(|| {
                    self.database
                        .database_url
                        .is_none()
                        .then(|| default_blob_dir(&self.database.db))
                }),
                max_blob_bytes: self.max_blob_bytes,
                max_chunk_bytes: self.max_blob_chunk_bytes.max(1),
                upload_expiry: self.blob_upload_expiry,
            },
        }
    }

    fn options(&self) -> ServeOptions {
        ServeOptions {
            listen: self.listen.clone(),
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            base_path: self.base_path.clone(),
            settings: self.settings(),
            shutdown_grace: self.shutdown_grace,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (once; only its hash is stored). The key is the last line of stdout.
    Add {
        /// A label for the key (e.g. the user or device it is for).
        name: Option<String>,
        /// Same as the positional NAME.
        #[arg(long = "name", conflicts_with = "name")]
        name_flag: Option<String>,
        /// Register this key instead of generating one (for demos and tests;
        /// generated keys are stronger).
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List keys (never the keys themselves).
    List {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke a key, by id or name. Its stories stay stored but nobody can reach them.
    Revoke {
        /// The key's id (from `keys list`) or name.
        key: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => {
            let options = args.options();
            match &args.database.database_url {
                Some(url) => {
                    let store = PostgresStore::connect(url, args.database.pg_pool_size).await?;
                    server::serve(store, options).await?;
                }
                None => {
                    let store = SqliteStore::open(&args.database.db, args.database.sqlite_sync)?;
                    server::serve(store, options).await?;
                }
            }
            Ok(())
        }
        Command::Keys { action } => {
            let database = match &action {
                KeysCommand::Add { database, .. }
                | KeysCommand::List { database }
                | KeysCommand::Revoke { database, .. } => database,
            };
            match &database.database_url {
                Some(url) => keys_command(&PostgresStore::connect(url, 1).await?, &action).await,
                None => {
                    keys_command(
                        &SqliteStore::open(&database.db, database.sqlite_sync)?,
                        &action,
                    )
                    .await
                }
            }
        }
    }
}

async fn keys_command<S: Storage>(store: &S, action: &KeysCommand) -> Result<(), CliError> {
    match action {
        KeysCommand::Add {
            name,
            name_flag,
            key,
            ..
        } => {
            let name = name
                .clone()
                .or_else(|| name_flag.clone())
                .unwrap_or_else(|| "unnamed".to_owned());
            let key = match key {
                Some(chosen) => {
                    keys::check_chosen(chosen)?;
                    chosen.clone()
                }
                None => keys::generate()?,
            };
            let record = store.add_key(name, keys::hash(&key), now_seconds()).await?;
            println!(
                "added key {} ({}), fingerprint {}; it is shown only this once:",
                record.id, record.name, record.fingerprint
            );
            println!("{key}");
        }
        KeysCommand::List { .. } => {
            let keys = store.list_keys().await?;
            println!(
                "{:>4}  {:<20}  {:<12}  {:<20}  STATUS",
                "ID", "NAME", "FINGERPRINT", "CREATED (UTC)"
            );
            for key in &keys {
                println!("{}", list_line(key));
            }
        }
        KeysCommand::Revoke { key, .. } => {
            let record = store.revoke_key(key.clone(), now_seconds()).await?;
            println!("revoked key {} ({})", record.id, record.name);
        }
    }
    Ok(())
}

fn list_line(key: &KeyRecord) -> String {
    let status = match key.revoked_at {
        Some(at) => format!("revoked {}", utc(at)),
        None => "active".to_owned(),
    };
    format!(
        "{:>4}  {:<20}  {:<12}  {:<20}  {status}",
        key.id,
        key.name,
        key.fingerprint,
        utc(key.created_at)
    )
}

/// `YYYY-MM-DD HH:MM:SS` for a Unix time (proleptic Gregorian, UTC).
fn utc(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_767_225_599), "2025-12-31 23:59:59");
    }

    #[test]
    fn cli_defaults_match_the_library_defaults() {
        let cli = Cli::try_parse_from(["whisker-sync-server", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let settings = args.settings();
        let defaults = Settings::default();
        assert_eq!(
            format!("{:?}", settings.limits),
            format!("{:?}", defaults.limits)
        );
        assert_eq!(settings.tombstone_retention, defaults.tombstone_retention);
        assert_eq!(settings.ws_idle_timeout, defaults.ws_idle_timeout);
        assert_eq!(args.listen, "127.0.0.1:8787");
        assert_eq!(settings.blobs.max_blob_bytes, defaults.blobs.max_blob_bytes);
        assert_eq!(
            settings.blobs.max_chunk_bytes,
            defaults.blobs.max_chunk_bytes
        );
        assert_eq!(settings.blobs.upload_expiry, defaults.blobs.upload_expiry);
        assert_eq!(
            settings.blobs.dir.as_deref(),
            Some(Path::new("whisker-sync-blobs"))
        );
        let pg = Cli::try_parse_from(["x", "serve", "--database-url", "postgres://h/db"]).unwrap();
        let Command::Serve(pg) = pg.command else {
            panic!("not serve");
        };
        assert_eq!(
            pg.settings().blobs.dir,
            None,
            "no default blob dir with PostgreSQL"
        );
        assert_eq!(
            default_blob_dir(Path::new("/var/lib/sync.db")),
            Path::new("/var/lib/sync-blobs")
        );
    }

    #[test]
    fn keys_add_takes_a_positional_or_flag_name() {
        let cli = Cli::try_parse_from(["x", "keys", "add", "laptop", "--db", "f.db"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys { action: KeysCommand::Add { name: Some(ref n), .. } } if n == "laptop"
        ));
        let cli =
            Cli::try_parse_from(["x", "keys", "add", "--name", "laptop", "--key", "k"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys {
                action: KeysCommand::Add {
                    name_flag: Some(_),
                    key: Some(_),
                    ..
                }
            }
        ));
    }
}
