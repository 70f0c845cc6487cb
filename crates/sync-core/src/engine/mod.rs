//! The sync engine: finds what changed locally since the last sync, queues it
//! durably, pulls what changed remotely, settles conflicts by the chosen
//! strategy, applies the winners to local storage and pushes the rest.
//!
//! The engine talks to its surroundings through small traits — [`Storage`]
//! (the stories), [`Transport`] (the server) and [`Host`] (progress, conflict
//! notices, the manual resolver) — and keeps its state in a
//! [`StateManager`](crate::state::StateManager). It is synchronous: the Lua
//! binding runs it on the Lua thread, which owns every callback it needs.
//!
//! # Rules (consistent with every old spec, see API_CONTRACT §2.7)
//!
//! 1. Operations from this device are never treated as remote changes.
//! 2. A remote version equal to what this device last synced is an echo, and
//!    one equal to the current local content only records the baseline.
//! 3. A local story never synced here that differs from a remote one is a
//!    conflict; its local time is the storage's `updated_at` when known, else 0.
//! 4. Every other local change takes the time it was found (or `updated_at`);
//!    last-write-wins orders by (timestamp, device id, operation id).
//! 5. Only winners are applied; a winning remote delete deletes.

mod bases;
mod filter;
mod link;
mod local;
mod memory;
mod scan;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use sha2::{Digest, Sha256};

use local::Local;
use thiserror::Error;

use crate::patch::{self, PATCH};
use crate::protocol::{
    self, last_write_wins, now_seconds, ConflictStrategy, ConflictType, OpType, Operation, Side,
};
use crate::state::{
    self as state_mod, Baseline, ErrorUpdate, StateError, StateManager, StateStore, SyncRecord,
};
use crate::value::{Map, Value};
use crate::wire::{PushResponse, ServerConflict, PATCH_REJECTED};

pub use bases::BaseStore;
pub use filter::{glob_match, story_tags, StoryFilter};
pub use link::HttpLink;
pub use memory::{MemoryStorage, MemoryStore};
pub use scan::validate_story_id;

/// A failure reported by one of the engine's collaborators, already worded
/// for the user ("storage save_story('x') failed: disk full").
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct HostError(pub String);

/// Why a sync failed.
#[derive(Debug, Error)]
pub enum SyncError {
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("invalid operation from server: {0}")]
    InvalidRemote(String),
    #[error("server rejected the push without reporting conflicts")]
    PushRejected,
    #[error("sync state: {0}")]
    State(#[from] StateError),
    #[error("sync state: {0}")]
    Bases(String),
    #[error("push still conflicted after {0} rounds; will retry on the next sync")]
    Unsettled(usize),
    #[error("no unresolved conflict for story \"{0}\"")]
    NoSuchConflict(String),
    #[error("the recorded conflict for story \"{0}\" is unreadable: {1}")]
    BadConflictRecord(String, String),
}

/// A story as the storage lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoryEntry {
    pub id: String,
    /// Unix seconds of the last local save, when the storage records it.
    pub updated_at: Option<i64>,
    /// The story's tags, when the storage lists them (selective sync by tag
    /// then needs no story to be read).
    pub tags: Option<Vec<String>>,
}

/// The stories on this device.
pub trait Storage {
    fn list(&mut self) -> Result<Vec<StoryEntry>, HostError>;
    fn load(&mut self, id: &str) -> Result<Option<Value>, HostError>;
    /// The story's [`content_hash`], `None` when it does not exist. Storages
    /// that can hash a story where it lies override this to skip converting it.
    fn hash(&mut self, id: &str) -> Result<Option<String>, HostError> {
        Ok(self.load(id)?.map(|story| content_hash(Some(&story))))
    }
    /// About how many bytes of JSON the story is (`None`: it does not exist),
    /// to tell whether it is long enough to patch. The default converts it.
    fn json_len(&mut self, id: &str) -> Result<Option<usize>, HostError> {
        Ok(self
            .load(id)?
            .map(|story| patch::json_len(&story).unwrap_or(0)))
    }
    fn save(&mut self, id: &str, story: &Value) -> Result<(), HostError>;
    fn delete(&mut self, id: &str) -> Result<(), HostError>;
    /// Sets a story's metadata through a dedicated call; `Ok(false)` when the
    /// storage has none (the engine then saves the whole story).
    fn update_metadata(&mut self, id: &str, metadata: &Value) -> Result<bool, HostError>;
}

/// One page of remote operations.
#[derive(Debug, Clone, Default)]
pub struct FetchPage {
    /// The operations as received; the engine validates them.
    pub operations: Vec<Value>,
    pub version: u64,
    pub has_more: bool,
    pub bytes_received: u64,
    /// The server applies patched updates (its answer listed the `patch` feature).
    pub accepts_patches: bool,
}

/// The server's answer to a push.
#[derive(Debug, Clone, Default)]
pub struct PushReply {
    pub success: bool,
    pub conflicts: Vec<ServerConflict>,
    /// `(operation id, server version)` of each stored operation, when known.
    pub accepted: Vec<(String, u64)>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl PushReply {
    /// Folds in the answer to a second push that re-sent some of the
    /// operations whole. This answer named conflicts, so it refused nothing
    /// wholesale; the second one's verdict is the one that counts.
    fn absorb(&mut self, resent: PushReply) {
        self.success = resent.success;
        self.conflicts.extend(resent.conflicts);
        self.accepted.extend(resent.accepted);
        self.bytes_sent += resent.bytes_sent;
        self.bytes_received += resent.bytes_received;
    }

    /// The reply for a server's answer, with the bytes the push moved.
    pub fn from_response(answer: PushResponse, bytes_sent: u64, bytes_received: u64) -> Self {
        PushReply {
            success: answer.success,
            accepted: answer
                .accepted()
                .into_iter()
                .map(|a| (a.op_id, a.version))
                .collect(),
            conflicts: answer.conflicts,
            bytes_sent,
            bytes_received,
        }
    }
}

/// Provides a story's current content, for [`Transport::push`].
pub type ContentSource<'a> = dyn FnMut(&str) -> Result<Option<Value>, HostError> + 'a;

/// Whether a create or update goes out with its story's current local
/// content: it carries neither `data` nor a patch.
pub fn needs_content(op: &Operation) -> bool {
    matches!(op.op_type, OpType::Create | OpType::Update)
        && op.data.is_none()
        && !patch::is_patched(op)
}

/// `operations` ready for the wire: each create or update that
/// [`needs_content`] gets its story's current content from `content`, and
/// one whose story is gone becomes a delete (what [`Transport::push`] promises).
pub fn with_content(
    operations: &[Operation],
    content: &mut ContentSource<'_>,
) -> Result<Vec<Operation>, HostError> {
    let mut operations = operations.to_vec();
    for op in &mut operations {
        if needs_content(op) {
            op.data = content(&op.story_id)?;
            if op.data.is_none() {
                op.op_type = OpType::Delete;
            }
        }
    }
    Ok(operations)
}

/// The server.
pub trait Transport {
    /// One page of operations after `since`. With `patches`, the server may
    /// send updates as patches against versions this device has seen (see
    /// [`crate::patch`]); the engine turns them back into whole stories.
    fn fetch(&mut self, device_id: &str, since: u64, patches: bool)
        -> Result<FetchPage, HostError>;
    /// Pushes operations. A create or update that [`needs_content`] carries
    /// the story's current local content: `content` provides it (a transport
    /// that reaches the stories itself may read them its own way); one whose
    /// story is gone is sent as a delete.
    fn push(
        &mut self,
        device_id: &str,
        operations: &[Operation],
        content: &mut ContentSource<'_>,
    ) -> Result<PushReply, HostError>;
}

/// Phases of a sync, reported through [`Host::progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Starting,
    CollectingLocal,
    FetchingRemote,
    DetectingConflicts,
    ResolvingConflicts,
    ApplyingRemote,
    PushingLocal,
    UpdatingState,
    Complete,
}

impl Step {
    /// Percent done when the phase starts.
    pub fn percent(self) -> u32 {
        match self {
            Step::Starting => 0,
            Step::CollectingLocal => 10,
            Step::FetchingRemote => 30,
            Step::DetectingConflicts => 50,
            Step::ResolvingConflicts => 60,
            Step::ApplyingRemote => 70,
            Step::PushingLocal => 85,
            Step::UpdatingState => 95,
            Step::Complete => 100,
        }
    }

    /// The `operation` name of `sync_progress` events.
    pub fn name(self) -> &'static str {
        match self {
            Step::Starting => "starting",
            Step::CollectingLocal => "collecting_local",
            Step::FetchingRemote => "fetching_remote",
            Step::DetectingConflicts => "detecting_conflicts",
            Step::ResolvingConflicts => "resolving_conflicts",
            Step::ApplyingRemote => "applying_remote",
            Step::PushingLocal => "pushing_local",
            Step::UpdatingState => "updating_state",
            Step::Complete => "complete",
        }
    }
}

/// Progress within a phase: `done` of `total` items (0 of 0 when not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub step: Step,
    pub done: usize,
    pub total: usize,
}

/// A story changed on both sides since they last agreed.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub story_id: String,
    pub conflict_type: ConflictType,
    /// The local change (latest queued operation; `data` is the local story).
    pub local: Operation,
    /// The remote change.
    pub remote: Operation,
    /// The story as both sides last had it, when known.
    pub base: Option<Value>,
}

/// What a manual resolver decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    KeepLocal,
    TakeRemote,
    KeepBoth,
    /// The story's new content (`None` deletes it).
    Use(Option<Value>),
}

/// How a conflict was settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    KeptLocal,
    TookRemote,
    Merged(Option<Value>),
    /// The local version was kept as a new story with this id.
    KeptBoth {
        copy_id: String,
    },
    /// Left for the user (manual strategy without a resolver).
    Unresolved,
}

/// The engine's view of the program using it.
pub trait Host {
    fn progress(&mut self, progress: Progress);
    /// Manual strategy: the user's decision, or `None` to leave it unresolved.
    fn resolve(&mut self, conflict: &Conflict) -> Result<Option<Decision>, HostError>;
    /// Called once per conflict, after it was settled.
    fn conflict_settled(&mut self, conflict: &Conflict, outcome: &Outcome, automatic: bool);
}

/// A host that shows nothing and decides nothing: manual conflicts stay
/// recorded for later, every other strategy settles its own. For programs
/// and tests that only want the sync done.
pub struct QuietHost;

impl Host for QuietHost {
    fn progress(&mut self, _: Progress) {}
    fn resolve(&mut self, _: &Conflict) -> Result<Option<Decision>, HostError> {
        Ok(None)
    }
    fn conflict_settled(&mut self, _: &Conflict, _: &Outcome, _: bool) {}
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Remote changes applied to local storage.
    pub applied: usize,
    /// Conflicts settled.
    pub conflicts: usize,
    /// Conflicts left for the user (manual strategy without a resolver).
    pub unresolved: usize,
    /// Operations the server accepted.
    pub pushed: usize,
    /// Whether the server was reached (false without a transport).
    pub exchanged: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub device_id: String,
    pub strategy: ConflictStrategy,
    /// Whether storage events reach [`Engine::mark_dirty`]; then syncs after
    /// the first load only the stories that changed.
    pub tracks_events: bool,
}

/// Upper bound on fetch pages in one sync (a misbehaving server that always
/// answers `has_more` cannot keep the engine looping).
const MAX_FETCH_PAGES: usize = 100_000;
/// Push rounds in one sync: a push conflicted by a concurrent change is
/// resolved against it and pushed again.
const MAX_PUSH_ROUNDS: usize = 4;
/// Every so many syncs the engine rereads every story even when it tracks
/// events, in case one changed without an event.
const FULL_SCAN_EVERY: u64 = 20;

/// Where the state records the selective-sync filter last used.
const FILTER_KEY: &str = "story_filter";

/// A sync engine for one device.
pub struct Engine {
    config: EngineConfig,
    filter: StoryFilter,
    dirty: BTreeSet<String>,
    full_scan_due: bool,
    syncs: u64,
}

/// Builds one part of a content hash: SHA-256 over canonical JSON written to
/// it, as 32 hex digits. Public so that callers holding stories in another
/// form (Lua tables) can hash them without converting them first. The text
/// is collected and hashed in one pass: JSON arrives in many small pieces.
pub struct ContentHasher {
    text: Vec<u8>,
    /// Bytes digested since the last reset: the length of a story's JSON
    /// once all its parts are digested.
    digested: usize,
}

impl Default for ContentHasher {
    fn default() -> Self {
        // Room for a typical story's JSON, so writing it rarely reallocates.
        ContentHasher {
            text: Vec::with_capacity(4096),
            digested: 0,
        }
    }
}

impl ContentHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn finish(mut self) -> String {
        self.digest()
    }

    /// Drops the text written since the last digest, and the count of bytes digested.
    pub fn reset(&mut self) {
        self.text.clear();
        self.digested = 0;
    }

    /// Bytes digested since the last reset.
    pub fn digested(&self) -> usize {
        self.digested
    }

    /// The digest of the text written since the last one; the buffer is
    /// kept for the next text.
    pub fn digest(&mut self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(&self.text)[..16]
            .iter()
            .flat_map(|b| {
                [
                    HEX[usize::from(b >> 4)] as char,
                    HEX[usize::from(b & 15)] as char,
                ]
            })
            .collect();
        self.digested += self.text.len();
        self.text.clear();
        digest
    }
}

impl std::io::Write for ContentHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    #[inline]
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.text.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of a value's canonical JSON (without the outermost member `skip`).
fn digest(value: &Value, skip: Option<&str>) -> String {
    let mut hasher = ContentHasher::new();
    if value.write_canonical_json(&mut hasher, skip).is_err() {
        // Not JSON (NaN, infinities): hash its debug form, which is stable too.
        hasher = ContentHasher {
            text: format!("{value:?}").into_bytes(),
            digested: 0,
        };
    }
    hasher.finish()
}

/// A story's content hash from the digests of its parts (see [`content_hash`]).
pub fn combine_hash(body: String, metadata: Option<String>) -> String {
    match metadata {
        Some(metadata) => format!("{body}:{metadata}"),
        None => body,
    }
}

/// Content hash of a story (or of its absence). A story with a `metadata`
/// member hashes as `body:metadata`, so a change to its metadata alone shows
/// as a change of the second part only.
pub fn content_hash(story: Option<&Value>) -> String {
    match story {
        None => "deleted".to_owned(),
        Some(story) => match story.get("metadata") {
            Some(metadata) => combine_hash(
                digest(story, Some("metadata")),
                Some(digest(metadata, None)),
            ),
            None => digest(story, None),
        },
    }
}

/// The body part of a content hash (see [`content_hash`]).
fn body_part(hash: &str) -> &str {
    hash.split_once(':').map_or(hash, |(body, _)| body)
}

/// Queue field of a queued create or update: the content hash of the story
/// version it stands for. The content itself stays in local storage, the
/// source of truth, until the push reads it; a later edit supersedes it.
pub const CONTENT_HASH: &str = "content_hash";

/// A queued change that makes a story's content the one hashing to `hash`
/// (`None`: a delete).
fn queued_change(op_type: OpType, id: &str, hash: Option<String>) -> Operation {
    let mut op = Operation::new(
        if hash.is_some() {
            op_type
        } else {
            OpType::Delete
        },
        id,
        None,
    );
    if let Some(hash) = hash {
        op.extra.insert(CONTENT_HASH.to_owned(), Value::Str(hash));
    }
    op
}

/// The content hash a queued create or update stands for.
fn queued_hash(op: &Operation) -> String {
    match op.extra.get(CONTENT_HASH) {
        Some(Value::Str(hash)) => hash.clone(),
        _ => content_hash(op.data.as_ref()),
    }
}

/// Whether a story id is reserved for sync bookkeeping (never synced).
pub fn is_reserved(id: &str) -> bool {
    id.starts_with('_')
}

/// The content a remote operation leaves the story with, given the story's
/// current content (metadata updates change only the `metadata` member).
fn effective_content(op: &Operation, current: Option<&Value>) -> Option<Option<Value>> {
    match op.op_type {
        OpType::Create | OpType::Update => Some(op.data.clone()),
        OpType::Delete => Some(None),
        OpType::MetadataUpdate => {
            let Some(Value::Object(story)) = current else {
                return None;
            };
            let mut story = story.clone();
            match &op.data {
                Some(metadata) => story.insert("metadata".into(), metadata.clone()),
                None => story.remove("metadata"),
            };
            Some(Some(Value::Object(story)))
        }
    }
}

/// Mutable view of the state during one sync; written with one `record_sync`.
struct Round {
    baselines: BTreeMap<String, Option<Baseline>>,
    /// Pending operations by story, oldest first (the engine's working copy).
    pending: BTreeMap<String, Vec<Operation>>,
    acknowledged: Vec<String>,
    /// Stories whose conflict waits for the user.
    held: BTreeMap<String, Value>,
    conflicts_changed: bool,
    server_version: u64,
    /// The server said it applies patched updates.
    accepts_patches: bool,
    report: SyncReport,
}

impl Round {
    fn baseline<'a, S>(&'a self, state: &'a StateManager<S>, id: &str) -> Option<&'a Baseline> {
        match self.baselines.get(id) {
            Some(b) => b.as_ref(),
            None => state.baseline(id),
        }
    }

    fn set_baseline(&mut self, id: &str, baseline: Option<Baseline>) {
        self.baselines.insert(id.to_owned(), baseline);
    }

    /// Drops every queued operation of a story (they are settled).
    fn settle_pending(&mut self, id: &str) {
        if let Some(ops) = self.pending.remove(id) {
            self.acknowledged.extend(ops.into_iter().map(|op| op.id));
        }
    }

    fn latest_pending(&self, id: &str) -> Option<&Operation> {
        self.pending.get(id).and_then(|ops| ops.last())
    }

    /// Moves past this device's newly stored operations when they took the
    /// sequence numbers right after the last version fetched: nothing another
    /// device pushed lies between, so the next fetch starts after them, and
    /// patches made against them count as seen (see [`crate::patch`]).
    fn skip_own(&mut self, versions: impl Iterator<Item = u64>) {
        let mut newer: Vec<u64> = versions.filter(|v| *v > self.server_version).collect();
        newer.sort_unstable();
        let follows = newer
            .iter()
            .zip(self.server_version + 1..)
            .all(|(version, next)| *version == next);
        if let (true, Some(last)) = (follows, newer.last()) {
            self.server_version = *last;
        }
    }
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            config,
            filter: StoryFilter::default(),
            dirty: BTreeSet::new(),
            full_scan_due: true,
            syncs: 0,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn set_strategy(&mut self, strategy: ConflictStrategy) {
        self.config.strategy = strategy;
    }

    /// Whether base snapshots are kept: only three-way merging needs them.
    fn keeps_bases(&self) -> bool {
        self.config.strategy == ConflictStrategy::AutoMerge
    }

    /// Limits syncing to the stories `filter` admits (selective sync). When
    /// the filter differs from the one the state last recorded, the next sync
    /// fetches from the beginning, so newly admitted stories arrive.
    pub fn set_filter(&mut self, filter: StoryFilter) {
        self.filter = filter;
    }

    pub fn filter(&self) -> &StoryFilter {
        &self.filter
    }

    /// Notes that a story changed (from a storage event).
    pub fn mark_dirty(&mut self, id: &str) {
        self.dirty.insert(id.to_owned());
    }

    /// Notes that stories may have changed without per-story events.
    pub fn mark_all_dirty(&mut self) {
        self.full_scan_due = true;
    }

    /// Runs one sync. Without a transport the local changes are still found and
    /// queued, and nothing else happens.
    pub fn sync<S: StateStore>(
        &mut self,
        storage: &mut dyn Storage,
        transport: Option<&mut dyn Transport>,
        state: &mut StateManager<S>,
        host: &mut dyn Host,
    ) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        self.syncs += 1;
        host.progress(Progress {
            step: Step::Starting,
            done: 0,
            total: 0,
        });
        let mut bases = BaseStore::new(self.keeps_bases());
        let deep = self.syncs % FULL_SCAN_EVERY == 0;
        let full = self.full_scan_due || !self.config.tracks_events || deep;
        let dirty = std::mem::take(&mut self.dirty);
        let scanned = scan::collect(
            &self.config,
            &self.filter,
            storage,
            state,
            scan::Scope {
                full,
                deep,
                dirty: &dirty,
            },
            host,
        );
        let scanned = match scanned {
            Ok(scanned) => scanned,
            Err(e) => {
                self.dirty.extend(dirty);
                return Err(e);
            }
        };
        self.full_scan_due = false;
        state.enqueue(&scanned.new_ops)?;
        let mut pending = scanned.queued;
        for op in scanned.new_ops {
            pending.entry(op.story_id.clone()).or_default().push(op);
        }

        let Some(transport) = transport else {
            host.progress(Progress {
                step: Step::Complete,
                done: 0,
                total: 0,
            });
            return Ok(SyncReport {
                duration_ms: started.elapsed().as_millis() as u64,
                ..SyncReport::default()
            });
        };

        let fingerprint = self.filter.fingerprint();
        let recorded = state.state().extra.get(FILTER_KEY).and_then(Value::as_str);
        let filter_changed =
            recorded.unwrap_or(&StoryFilter::default().fingerprint()) != fingerprint;
        let mut round = Round {
            baselines: BTreeMap::new(),
            pending,
            acknowledged: Vec::new(),
            held: BTreeMap::new(),
            conflicts_changed: false,
            // A changed subset starts over from a snapshot, so stories the
            // old filter skipped arrive now.
            server_version: if filter_changed {
                0
            } else {
                state.server_version()
            },
            accepts_patches: false,
            report: SyncReport {
                exchanged: true,
                ..SyncReport::default()
            },
        };
        for conflict in state.conflicts() {
            if let Some(id) = conflict.get("story_id").and_then(Value::as_str) {
                round.held.insert(id.to_owned(), conflict.clone());
            }
        }
        let times = scanned.times;
        let mut local = Local::new(scanned.hashes);
        let mut settled = false;
        let mut unresolved_push: Vec<ServerConflict> = Vec::new();
        for _ in 0..MAX_PUSH_ROUNDS {
            let remote = self.fetch_all(transport, state, &mut bases, &mut round, host)?;
            if round.accepts_patches {
                bases.keep_patchable();
            }
            self.reconcile(
                remote, storage, state, &mut bases, &mut local, &mut round, host,
            )?;
            for conflict in unresolved_push.drain(..) {
                // The server's newer version of the story is our own (fetches
                // leave out this device's operations): rebase onto it.
                if let Some(version) = conflict.server_version {
                    if let Some(b) = round.baseline(state, &conflict.id).cloned() {
                        round.set_baseline(&conflict.id, Some(Baseline { version, ..b }));
                    }
                }
            }
            let new_ops = self.queue_rewritten(&round, state)?;
            state.enqueue(&new_ops)?;
            unresolved_push = self.push(
                transport, storage, state, &mut bases, &mut local, &mut round, host,
            )?;
            if unresolved_push.is_empty() {
                settled = true;
                break;
            }
        }
        host.progress(Progress {
            step: Step::UpdatingState,
            done: 0,
            total: 0,
        });
        // Stories whose content is what was synced: remember their
        // `updated_at`, so the next scan can skip them while it is unchanged.
        for read in times {
            let Some(baseline) = round.baseline(state, &read.id) else {
                continue;
            };
            if read.hash == baseline.hash && baseline.updated_at != Some(read.updated_at) {
                let touched = Baseline {
                    updated_at: Some(read.updated_at),
                    ..baseline.clone()
                };
                round.set_baseline(&read.id, Some(touched));
            }
        }
        bases.save(state)?;
        round.report.duration_ms = started.elapsed().as_millis() as u64;
        let report = round.report.clone();
        state.record_sync(SyncRecord {
            server_version: Some(round.server_version),
            baselines: round.baselines.into_iter().collect(),
            acknowledged: round.acknowledged,
            completed: settled,
            duration_ms: report.duration_ms,
            bytes_sent: report.bytes_sent,
            bytes_received: report.bytes_received,
            conflicts_resolved: report.conflicts as u64,
            status: Some(state_mod::status::IDLE.to_owned()),
            error: if settled {
                ErrorUpdate::Clear
            } else {
                ErrorUpdate::Keep
            },
            last_sync_time: settled.then(now_seconds),
            conflicts: round
                .conflicts_changed
                .then(|| round.held.into_values().collect()),
        })?;
        if !settled {
            return Err(SyncError::Unsettled(MAX_PUSH_ROUNDS));
        }
        if filter_changed {
            state.update(|s| {
                s.extra
                    .insert(FILTER_KEY.to_owned(), Value::Str(fingerprint));
            })?;
        }
        host.progress(Progress {
            step: Step::Complete,
            done: 0,
            total: 0,
        });
        Ok(report)
    }

    /// Resolves a conflict the manual strategy left for the user: applies the
    /// decision locally and queues what the server must learn; the next sync
    /// pushes it.
    pub fn resolve_held<S: StateStore>(
        &mut self,
        story_id: &str,
        decision: Decision,
        storage: &mut dyn Storage,
        state: &mut StateManager<S>,
    ) -> Result<Outcome, SyncError> {
        let mut held = state.conflicts().to_vec();
        let position = held
            .iter()
            .position(|c| c.get("story_id").and_then(Value::as_str) == Some(story_id))
            .ok_or_else(|| SyncError::NoSuchConflict(story_id.to_owned()))?;
        let record = held.remove(position);
        let unreadable = |e: String| SyncError::BadConflictRecord(story_id.to_owned(), e);
        let op_of = |name: &str| {
            record
                .get(name)
                .ok_or_else(|| format!("{name} is missing"))
                .and_then(|op| scan::parse_remote(op.clone()))
                .map_err(unreadable)
        };
        let (local, remote) = (op_of("local")?, op_of("remote")?);
        let conflict = Conflict {
            story_id: story_id.to_owned(),
            conflict_type: ConflictType::of(Some(local.op_type), Some(remote.op_type)),
            local,
            remote,
            base: None,
        };
        let outcome = match decision {
            Decision::KeepLocal => Outcome::KeptLocal,
            Decision::TakeRemote => Outcome::TookRemote,
            Decision::KeepBoth => Outcome::KeptBoth {
                copy_id: protocol::keep_both_ids(story_id, &conflict.local.id, &conflict.remote.id)
                    .0,
            },
            Decision::Use(content) => Outcome::Merged(content),
        };
        write_outcome(storage, &conflict, &outcome)?;
        let pending: Vec<String> = state
            .pending_operations()
            .into_iter()
            .filter(|op| op.story_id == story_id)
            .map(|op| op.id)
            .collect();
        let mut follow_up = Vec::new();
        let mut record = SyncRecord::default();
        match &outcome {
            Outcome::KeptLocal | Outcome::Unresolved => {}
            Outcome::TookRemote => record.acknowledged = pending,
            Outcome::Merged(content) => {
                record.acknowledged = pending;
                let hash = content.as_ref().map(|c| content_hash(Some(c)));
                follow_up.push(queued_change(OpType::Update, story_id, hash));
            }
            Outcome::KeptBoth { copy_id } => {
                record.acknowledged = pending;
                let hash = conflict.local.data.as_ref().map(|c| content_hash(Some(c)));
                follow_up.push(queued_change(OpType::Create, copy_id, hash));
            }
        }
        for op in &mut follow_up {
            op.device_id = self.config.device_id.clone();
        }
        state.enqueue(&follow_up)?;
        let incoming = conflict.remote.data.clone();
        let mut bases = BaseStore::new(self.keeps_bases());
        bases.set(story_id, incoming.clone());
        bases.save(state)?;
        record.baselines = vec![(
            story_id.to_owned(),
            incoming.as_ref().map(|content| Baseline {
                hash: content_hash(Some(content)),
                version: conflict
                    .remote
                    .version
                    .unwrap_or_else(|| state.server_version()),
                updated_at: None,
            }),
        )];
        record.conflicts = Some(held);
        state.record_sync(record)?;
        Ok(outcome)
    }

    /// Fetches every page after the last version seen; validates and returns
    /// the operations of other devices, in server order.
    fn fetch_all<S: StateStore>(
        &self,
        transport: &mut dyn Transport,
        state: &mut StateManager<S>,
        bases: &mut BaseStore,
        round: &mut Round,
        host: &mut dyn Host,
    ) -> Result<Vec<Operation>, SyncError> {
        host.progress(Progress {
            step: Step::FetchingRemote,
            done: 0,
            total: 0,
        });
        let mut operations = Vec::new();
        let mut since = round.server_version;
        // Patches are only of use with bases, which need a store that keeps records.
        let patches = state.store().keeps_records();
        for _ in 0..MAX_FETCH_PAGES {
            let mut page = transport.fetch(&self.config.device_id, since, patches)?;
            round.report.bytes_received += page.bytes_received;
            let mut parsed = parse_page(std::mem::take(&mut page.operations))?;
            if !unpatch_page(&mut parsed, state, bases, round)? {
                // A patch against a version this device does not hold: the
                // same page again, whole.
                page = transport.fetch(&self.config.device_id, since, false)?;
                round.report.bytes_received += page.bytes_received;
                parsed = parse_page(std::mem::take(&mut page.operations))?;
                if !unpatch_page(&mut parsed, state, bases, round)? {
                    return Err(SyncError::InvalidRemote(
                        "the server sent a patch this device cannot apply, when asked for whole stories".into(),
                    ));
                }
            }
            let received = parsed.len();
            for op in parsed {
                if op.device_id != self.config.device_id {
                    operations.push(op);
                } else if let Some(version) = op.version {
                    // Our own operation, stored: an acknowledgement.
                    round.acknowledge_own(&op, version);
                }
            }
            since = page.version;
            round.accepts_patches = page.accepts_patches;
            host.progress(Progress {
                step: Step::FetchingRemote,
                done: operations.len(),
                total: operations.len(),
            });
            if !page.has_more || received == 0 {
                break;
            }
        }
        round.server_version = since;
        Ok(operations)
    }

    /// Settles each remotely changed story against local changes and applies
    /// the winners to storage.
    #[allow(clippy::too_many_arguments)]
    fn reconcile<S: StateStore>(
        &mut self,
        remote: Vec<Operation>,
        storage: &mut dyn Storage,
        state: &mut StateManager<S>,
        bases: &mut BaseStore,
        local: &mut Local,
        round: &mut Round,
        host: &mut dyn Host,
    ) -> Result<(), SyncError> {
        host.progress(Progress {
            step: Step::DetectingConflicts,
            done: 0,
            total: remote.len(),
        });
        // The latest operation per story decides; earlier ones are superseded.
        let mut latest: BTreeMap<String, Operation> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for op in remote {
            if !latest.contains_key(&op.story_id) {
                order.push(op.story_id.clone());
            }
            latest.insert(op.story_id.clone(), op);
        }
        let total = order.len();
        for (done, id) in order.into_iter().enumerate() {
            let remote = latest.remove(&id).expect("collected above");
            // A metadata update applies to the story as it is here.
            let current_for_metadata = match remote.op_type {
                OpType::MetadataUpdate => local.content(storage, &id)?,
                _ => None,
            };
            let Some(incoming) = effective_content(&remote, current_for_metadata.as_ref()) else {
                // Metadata for a story this device does not have: nothing to apply.
                continue;
            };
            let admitted = match self.filter.admits_id(&id) {
                Some(admitted) => admitted,
                None => match &incoming {
                    Some(story) => self.filter.admits_tags(story_tags(story)),
                    // A delete concerns this device if it has synced the story.
                    None => round.baseline(state, &id).is_some(),
                },
            };
            if !admitted {
                continue;
            }
            let version = remote.version.unwrap_or(round.server_version);
            let incoming_hash = content_hash(incoming.as_ref());
            let new_baseline = incoming.as_ref().map(|_| Baseline {
                hash: incoming_hash.clone(),
                version,
                updated_at: None,
            });
            if let Some(conflict) = round.held.get_mut(&id) {
                // Still waiting for the user: resolve against the newest remote.
                if let (Value::Object(record), Ok(op)) =
                    (conflict, state_mod::operation_value(&remote))
                {
                    record.insert("remote".into(), op);
                    round.conflicts_changed = true;
                }
                continue;
            }
            let baseline = round.baseline(state, &id).cloned();
            if baseline.as_ref().map(|b| &b.hash) == Some(&incoming_hash) {
                round.set_baseline(&id, new_baseline);
                continue;
            }
            if local.hash(storage, &id)? == incoming_hash {
                round.settle_pending(&id);
                bases.set(&id, incoming.clone());
                round.set_baseline(&id, new_baseline);
                continue;
            }
            let Some(local_op) = round.latest_pending(&id).cloned() else {
                self.apply(storage, &id, &remote, incoming.as_ref(), host, done, total)?;
                local.applied(&id, incoming_hash.clone());
                bases.set(&id, incoming);
                round.set_baseline(&id, new_baseline);
                round.report.applied += 1;
                continue;
            };
            let base = match &baseline {
                Some(b) if self.keeps_bases() => bases.get(state, &id, &b.hash)?,
                _ => None,
            };
            let current = local.content(storage, &id)?;
            let conflict = Conflict {
                story_id: id.clone(),
                conflict_type: ConflictType::of(Some(local_op.op_type), Some(remote.op_type)),
                local: Operation {
                    data: current.clone(),
                    ..local_op
                },
                remote: Operation {
                    data: incoming.clone(),
                    ..remote.clone()
                },
                base,
            };
            host.progress(Progress {
                step: Step::ResolvingConflicts,
                done,
                total,
            });
            let (outcome, automatic) = self.settle(&conflict, host)?;
            if outcome == Outcome::Unresolved {
                round.report.unresolved += 1;
            } else {
                round.report.conflicts += 1;
            }
            match &outcome {
                Outcome::KeptLocal => {
                    bases.set(&id, incoming.clone());
                    round.set_baseline(&id, new_baseline);
                }
                Outcome::TookRemote => {
                    self.apply(storage, &id, &remote, incoming.as_ref(), host, done, total)?;
                    local.set(&id, incoming.clone());
                    round.settle_pending(&id);
                    bases.set(&id, incoming.clone());
                    round.set_baseline(&id, new_baseline);
                    round.report.applied += 1;
                }
                Outcome::Merged(merged) => {
                    if merged == &incoming {
                        self.apply(storage, &id, &remote, incoming.as_ref(), host, done, total)?;
                        round.settle_pending(&id);
                    } else {
                        write_story(storage, &id, merged.as_ref())?;
                        round.settle_pending(&id);
                        round.rewrite(&id, merged.as_ref(), OpType::Update);
                    }
                    local.set(&id, merged.clone());
                    bases.set(&id, incoming.clone());
                    round.set_baseline(&id, new_baseline);
                    round.report.applied += 1;
                }
                Outcome::KeptBoth { copy_id } => {
                    write_story(storage, copy_id, current.as_ref())?;
                    round.rewrite(copy_id, current.as_ref(), OpType::Create);
                    local.set(copy_id, current.clone());
                    self.apply(storage, &id, &remote, incoming.as_ref(), host, done, total)?;
                    local.set(&id, incoming.clone());
                    round.settle_pending(&id);
                    bases.set(&id, incoming.clone());
                    round.set_baseline(&id, new_baseline);
                    round.report.applied += 1;
                }
                Outcome::Unresolved => {
                    round.held.insert(id.clone(), unresolved_record(&conflict));
                    round.conflicts_changed = true;
                }
            }
            host.conflict_settled(&conflict, &outcome, automatic);
        }
        Ok(())
    }

    /// Decides one conflict by the configured strategy (the manual one asks
    /// the host). Returns the outcome and whether it was automatic.
    pub fn settle(
        &self,
        conflict: &Conflict,
        host: &mut dyn Host,
    ) -> Result<(Outcome, bool), SyncError> {
        let winner = last_write_wins(&conflict.local.order_key(), &conflict.remote.order_key());
        let (local, remote) = (conflict.local.data.as_ref(), conflict.remote.data.as_ref());
        let outcome = match self.config.strategy {
            ConflictStrategy::LastWriteWins => match winner {
                Side::Local => Outcome::KeptLocal,
                Side::Remote => Outcome::TookRemote,
            },
            ConflictStrategy::AutoMerge => Outcome::Merged(protocol::merge(
                conflict.base.as_ref(),
                local,
                remote,
                winner,
            )),
            ConflictStrategy::KeepBoth => match (local, remote) {
                (Some(_), Some(_)) => {
                    let (copy_id, _) = protocol::keep_both_ids(
                        &conflict.story_id,
                        &conflict.local.id,
                        &conflict.remote.id,
                    );
                    Outcome::KeptBoth { copy_id }
                }
                // Only one side still has the story: keep that version.
                (Some(_), None) => Outcome::KeptLocal,
                (None, _) => Outcome::TookRemote,
            },
            ConflictStrategy::Manual => {
                let decision = host.resolve(conflict)?;
                let outcome = match decision {
                    None => Outcome::Unresolved,
                    Some(Decision::KeepLocal) => Outcome::KeptLocal,
                    Some(Decision::TakeRemote) => Outcome::TookRemote,
                    Some(Decision::KeepBoth) => {
                        let (copy_id, _) = protocol::keep_both_ids(
                            &conflict.story_id,
                            &conflict.local.id,
                            &conflict.remote.id,
                        );
                        Outcome::KeptBoth { copy_id }
                    }
                    Some(Decision::Use(content)) => Outcome::Merged(content),
                };
                return Ok((outcome, false));
            }
        };
        Ok((outcome, true))
    }

    /// Applies a remote change to storage.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        storage: &mut dyn Storage,
        id: &str,
        remote: &Operation,
        content: Option<&Value>,
        host: &mut dyn Host,
        done: usize,
        total: usize,
    ) -> Result<(), SyncError> {
        host.progress(Progress {
            step: Step::ApplyingRemote,
            done,
            total,
        });
        if remote.op_type == OpType::MetadataUpdate {
            let metadata = remote.data.clone().unwrap_or_default();
            if storage.update_metadata(id, &metadata)? {
                return Ok(());
            }
        }
        write_story(storage, id, content)
    }

    /// Operations queued during this sync's reconciliation (merges, copies).
    fn queue_rewritten<S>(
        &self,
        round: &Round,
        state: &StateManager<S>,
    ) -> Result<Vec<Operation>, SyncError> {
        let queued: BTreeSet<&str> = state
            .pending_values()
            .filter_map(|v| v.get("id")?.as_str())
            .collect();
        Ok(round
            .pending
            .values()
            .flatten()
            .filter(|op| !queued.contains(op.id.as_str()))
            .cloned()
            .collect())
    }

    /// Pushes the latest pending operation of each story (earlier ones are
    /// superseded) with the story's current server version as its base and
    /// the story's current content. Returns the conflicts the server reported.
    #[allow(clippy::too_many_arguments)]
    fn push<S: StateStore>(
        &self,
        transport: &mut dyn Transport,
        storage: &mut dyn Storage,
        state: &mut StateManager<S>,
        bases: &mut BaseStore,
        local: &mut Local,
        round: &mut Round,
        host: &mut dyn Host,
    ) -> Result<Vec<ServerConflict>, SyncError> {
        // Each story's latest operation goes out (moved, not copied), with the
        // content hash it stands for; it returns to the queue if the server
        // does not take it.
        let mut outgoing: Vec<Operation> = Vec::new();
        let mut hashes: Vec<Option<String>> = Vec::new();
        let stories: Vec<String> = round.pending.keys().cloned().collect();
        for id in stories {
            if round.held.contains_key(&id) {
                continue;
            }
            let (baseline, base_hash) = match round.baseline(state, &id) {
                Some(b) => (Some(b.version), Some(b.hash.clone())),
                None => (None, None),
            };
            let never_pushed = baseline.is_none()
                && round
                    .latest_pending(&id)
                    .is_some_and(|op| op.op_type == OpType::Delete);
            if never_pushed {
                // Created and deleted before the server ever saw it.
                round.settle_pending(&id);
                continue;
            }
            let admitted = match self.filter.admits_id(&id) {
                Some(admitted) => admitted,
                None if round
                    .latest_pending(&id)
                    .is_some_and(|op| op.op_type == OpType::Delete) =>
                {
                    true
                }
                None => local
                    .content(storage, &id)?
                    .is_some_and(|story| self.filter.admits_tags(story_tags(&story))),
            };
            if !admitted {
                continue;
            }
            let Some(mut op) = round.pending.get_mut(&id).and_then(Vec::pop) else {
                continue;
            };
            op.base_version = baseline;
            op.device_id.clone_from(&self.config.device_id);
            let hash = match op.op_type {
                OpType::Create | OpType::Update => Some(queued_hash(&op)),
                OpType::MetadataUpdate => Some(local.hash(storage, &id)?),
                OpType::Delete => None,
            };
            // The queue's own field; the transport sends the content itself.
            op.extra.remove(CONTENT_HASH);
            if let (true, OpType::Update, Some(base_hash)) =
                (round.accepts_patches, op.op_type, base_hash)
            {
                patch_update(&mut op, storage, state, bases, local, &base_hash)?;
            }
            outgoing.push(op);
            hashes.push(hash);
        }
        host.progress(Progress {
            step: Step::PushingLocal,
            done: 0,
            total: outgoing.len(),
        });
        if outgoing.is_empty() {
            return Ok(Vec::new());
        }
        let mut content = |id: &str| {
            local
                .content(storage, id)
                .map_err(|e| HostError(e.to_string()))
        };
        let mut reply = transport.push(&self.config.device_id, &outgoing, &mut content);
        let mut resend_refused = false;
        if let Ok(first) = &mut reply {
            let unpatched = unpatch_rejected(first, &mut outgoing);
            if !unpatched.is_empty() {
                match transport.push(&self.config.device_id, &unpatched, &mut content) {
                    Ok(second) => {
                        resend_refused = !second.success && second.conflicts.is_empty();
                        first.absorb(second);
                    }
                    Err(e) => reply = Err(e),
                }
            }
        }
        let conflicted: BTreeSet<String> = match &reply {
            Ok(reply) => reply.conflicts.iter().map(|c| c.id.clone()).collect(),
            Err(_) => BTreeSet::new(),
        };
        let rejected = match &reply {
            Ok(reply) => resend_refused || (!reply.success && reply.conflicts.is_empty()),
            Err(_) => true,
        };
        let accepted: std::collections::HashMap<&str, u64> = match &reply {
            Ok(reply) => reply
                .accepted
                .iter()
                .map(|(id, v)| (id.as_str(), *v))
                .collect(),
            Err(_) => Default::default(),
        };
        let total = outgoing.len();
        for (mut op, hash) in outgoing.into_iter().zip(hashes) {
            if rejected || conflicted.contains(&op.story_id) {
                // Made against the base of this push; the next one makes its own.
                patch::detach(&mut op);
                if let (OpType::Create | OpType::Update, Some(hash)) = (op.op_type, &hash) {
                    op.extra
                        .insert(CONTENT_HASH.to_owned(), Value::Str(hash.clone()));
                }
                round
                    .pending
                    .entry(op.story_id.clone())
                    .or_default()
                    .push(op);
                continue;
            }
            // Without the operation's own version, use the last version
            // fetched: possibly stale, which the server then reports and the
            // next round rebases.
            let version = accepted
                .get(op.id.as_str())
                .copied()
                .unwrap_or(round.server_version);
            round.settle_pending(&op.story_id);
            round.acknowledged.push(op.id);
            round.set_baseline(
                &op.story_id,
                hash.map(|hash| Baseline {
                    hash,
                    version,
                    updated_at: None,
                }),
            );
            if bases.wants(|| storage.json_len(&op.story_id))? {
                bases.set(&op.story_id, local.content(storage, &op.story_id)?);
            }
            round.report.pushed += 1;
        }
        if !rejected {
            round.skip_own(accepted.values().copied());
        }
        let reply = reply?;
        round.report.bytes_sent += reply.bytes_sent;
        round.report.bytes_received += reply.bytes_received;
        if rejected {
            return Err(SyncError::PushRejected);
        }
        host.progress(Progress {
            step: Step::PushingLocal,
            done: total,
            total,
        });
        Ok(reply.conflicts)
    }
}

/// The operations of a fetched page, each checked (see [`scan::parse_remote`]).
fn parse_page(values: Vec<Value>) -> Result<Vec<Operation>, SyncError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            scan::parse_remote(value)
                .map_err(|e| SyncError::InvalidRemote(format!("operation {}: {e}", i + 1)))
        })
        .collect()
}

/// Turns each patched update of a page into the whole update it stands for,
/// from the base this device holds. `false` when one cannot be: this device
/// has no base of that version, or the result is not what the server said.
fn unpatch_page<S: StateStore>(
    operations: &mut [Operation],
    state: &mut StateManager<S>,
    bases: &mut BaseStore,
    round: &Round,
) -> Result<bool, SyncError> {
    for op in operations.iter_mut() {
        let Some((patch, claimed)) = patch::detach(op) else {
            continue;
        };
        let Some(baseline) = round
            .baseline(state, &op.story_id)
            .filter(|b| Some(b.version) == op.base_version)
            .cloned()
        else {
            return Ok(false);
        };
        let Some(base) = bases.get(state, &op.story_id, &baseline.hash)? else {
            return Ok(false);
        };
        let story = claimed
            .as_ref()
            .and_then(Value::as_str)
            .and_then(|claimed| patch::apply_checked(&base, &patch, claimed));
        match story {
            Some(story) => op.data = Some(story),
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// Turns a queued update into a patched one (see [`crate::patch`]) when this
/// device holds the synced version the server has (`base_hash` is its content
/// hash) and a patch is worth it; otherwise leaves it whole.
fn patch_update<S: StateStore>(
    op: &mut Operation,
    storage: &mut dyn Storage,
    state: &mut StateManager<S>,
    bases: &mut BaseStore,
    local: &mut Local,
    base_hash: &str,
) -> Result<(), SyncError> {
    let Some(base) = bases.get(state, &op.story_id, base_hash)? else {
        return Ok(());
    };
    let Some(content) = local.content(storage, &op.story_id)? else {
        return Ok(());
    };
    if let Some(patch) = patch::worthwhile(&base, &content) {
        op.extra.insert(PATCH.to_owned(), patch);
        // The hash the scan found for the story, which is this content.
        let hash = local.hash(storage, &op.story_id)?;
        op.extra.insert(CONTENT_HASH.to_owned(), Value::Str(hash));
    }
    Ok(())
}

/// Takes the server's `patch_rejected` conflicts out of `reply` and returns
/// those operations without their patches, to be sent again whole.
fn unpatch_rejected(reply: &mut PushReply, outgoing: &mut [Operation]) -> Vec<Operation> {
    let refused: BTreeSet<String> = reply
        .conflicts
        .iter()
        .filter(|c| c.conflict_type == PATCH_REJECTED)
        .map(|c| c.id.clone())
        .collect();
    if refused.is_empty() {
        return Vec::new();
    }
    reply
        .conflicts
        .retain(|c| c.conflict_type != PATCH_REJECTED);
    outgoing
        .iter_mut()
        .filter(|op| refused.contains(&op.story_id))
        .map(|op| {
            patch::detach(op);
            op.clone()
        })
        .collect()
}

/// Saves a story's content, or deletes it when `None`.
fn write_story(
    storage: &mut dyn Storage,
    id: &str,
    content: Option<&Value>,
) -> Result<(), SyncError> {
    match content {
        Some(story) => storage.save(id, story)?,
        None => storage.delete(id)?,
    }
    Ok(())
}

/// Writes a settled conflict's result to storage (used where no sync is
/// running: the old `_resolve_conflicts` call and user resolutions).
pub fn write_outcome(
    storage: &mut dyn Storage,
    conflict: &Conflict,
    outcome: &Outcome,
) -> Result<(), SyncError> {
    match outcome {
        Outcome::KeptLocal | Outcome::Unresolved => Ok(()),
        Outcome::TookRemote => {
            write_story(storage, &conflict.story_id, conflict.remote.data.as_ref())
        }
        Outcome::Merged(content) => write_story(storage, &conflict.story_id, content.as_ref()),
        Outcome::KeptBoth { copy_id } => {
            write_story(storage, copy_id, conflict.local.data.as_ref())?;
            write_story(storage, &conflict.story_id, conflict.remote.data.as_ref())
        }
    }
}

/// How an unresolved conflict is kept in the state for later resolution.
fn unresolved_record(conflict: &Conflict) -> Value {
    let op = |op: &Operation| state_mod::operation_value(op).unwrap_or_default();
    Value::Object(Map::from([
        (
            "story_id".to_owned(),
            Value::from(conflict.story_id.as_str()),
        ),
        (
            "conflict_type".to_owned(),
            Value::from(conflict.conflict_type.as_str()),
        ),
        ("local".to_owned(), op(&conflict.local)),
        ("remote".to_owned(), op(&conflict.remote)),
        ("detected_at".to_owned(), Value::Int(now_seconds())),
    ]))
}

impl Round {
    /// Queues a new operation for a story whose content this sync decided.
    fn rewrite(&mut self, id: &str, content: Option<&Value>, kind: OpType) {
        let op = queued_change(kind, id, content.map(|c| content_hash(Some(c))));
        self.pending.entry(id.to_owned()).or_default().push(op);
    }

    /// An operation of ours the server reports having stored.
    fn acknowledge_own(&mut self, op: &Operation, version: u64) {
        let Some(ops) = self.pending.get_mut(&op.story_id) else {
            return;
        };
        if let Some(at) = ops.iter().position(|p| p.id == op.id) {
            let acked: Vec<Operation> = ops.drain(..=at).collect();
            self.acknowledged.extend(acked.into_iter().map(|p| p.id));
            if ops.is_empty() {
                self.pending.remove(&op.story_id);
                self.set_baseline(
                    &op.story_id,
                    Some(Baseline {
                        hash: content_hash(op.data.as_ref()),
                        version,
                        updated_at: None,
                    }),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
