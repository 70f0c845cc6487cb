//! Integration suite: every scenario starts the real `whisker-sync-server`
//! binary on an ephemeral loopback port, and runs once per storage backend
//! (SQLite, and PostgreSQL in a throwaway cluster shared by this run).
//!
//! Custom harness (libtest-mimic) so the PostgreSQL cluster is started once,
//! only if a PostgreSQL scenario runs, and stopped after all of them.
//! `WHISKER_SKIP_PG=1` marks the PostgreSQL scenarios ignored; otherwise a
//! machine without PostgreSQL fails them with a message saying what to install.

mod blobs;
mod compression;
mod crash;
mod http;
mod load;
mod operations;
mod patches;
#[path = "../../../sync-core/tests/support/reliability.rs"]
mod reliability;
mod security;
mod support;
mod websocket;

use std::future::Future;
use std::pin::Pin;

use libtest_mimic::{Arguments, Failed, Trial};
use support::{Backend, TestResult};

type Scenario = fn(Backend) -> Pin<Box<dyn Future<Output = TestResult>>>;

const BOTH: &[Backend] = &[Backend::Sqlite, Backend::Postgres];
const SQLITE: &[Backend] = &[Backend::Sqlite];
const POSTGRES: &[Backend] = &[Backend::Postgres];

macro_rules! scenarios {
    ($($module:ident :: $name:ident on $backends:expr),* $(,)?) => {
        vec![$((
            stringify!($name),
            $backends,
            (|backend| Box::pin($module::$name(backend))) as Scenario,
        )),*]
    };
}

fn main() {
    let args = Arguments::from_args();
    let scenarios: Vec<(&str, &[Backend], Scenario)> = scenarios![
        blobs::chunked_upload_and_ranged_download on SQLITE,
        blobs::uploads_survive_a_restart on SQLITE,
        blobs::blobs_are_off_without_a_directory on POSTGRES,
        compression::http_bodies_are_negotiated on SQLITE,
        compression::websocket_frames_are_negotiated on SQLITE,
        http::push_then_pull_round_trip on BOTH,
        http::repush_is_idempotent on BOTH,
        http::pagination on BOTH,
        http::snapshot_and_tombstones on BOTH,
        http::stale_base_version_conflicts on BOTH,
        http::concurrent_pushes_get_unique_versions on BOTH,
        http::malformed_input_writes_nothing on BOTH,
        http::old_client_shapes on BOTH,
        http::key_isolation on BOTH,
        websocket::requests_and_answers on BOTH,
        websocket::fan_out_to_other_devices on BOTH,
        websocket::authentication_rules on BOTH,
        websocket::fan_out_across_two_processes on POSTGRES,
        operations::restart_keeps_data on BOTH,
        operations::keys_cli on BOTH,
        operations::health_and_metrics on BOTH,
        operations::graceful_shutdown on BOTH,
        operations::tls on SQLITE,
        operations::base_path on SQLITE,
        patches::stores_apply_patches_in_the_push_transaction on BOTH,
        patches::stores_serve_patched_forms_to_clients_holding_the_base on BOTH,
        patches::databases_from_before_patched_forms_are_migrated on BOTH,
        crash::acknowledged_pushes_survive_kill9 on BOTH,
        load::thirty_two_clients on BOTH,
        security::isolation_on_every_route on BOTH,
        security::keys_hashed_at_rest on BOTH,
        security::no_keys_in_logs on BOTH,
        security::tls_with_a_private_ca on SQLITE,
        security::size_limits on BOTH,
        security::unauthenticated_websockets_are_closed on BOTH,
    ];
    let skip_pg = std::env::var("WHISKER_SKIP_PG").is_ok_and(|v| v == "1");
    let mut trials = Vec::new();
    for (name, backends, scenario) in scenarios {
        for &backend in backends {
            let trial = Trial::test(format!("{backend}::{name}"), move || run(scenario, backend));
            trials.push(trial.with_ignored_flag(skip_pg && backend == Backend::Postgres));
        }
    }
    let conclusion = libtest_mimic::run(&args, trials);
    support::stop_cluster();
    conclusion.exit();
}

fn run(scenario: Scenario, backend: Backend) -> Result<(), Failed> {
    support::block_on(scenario(backend)).map_err(|e| Failed::from(e.to_string()))
}
