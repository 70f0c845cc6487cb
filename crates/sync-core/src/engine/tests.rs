//! Engine behaviour against in-memory doubles: a storage, a server with the
//! reference server's rules (sequence numbers, idempotent pushes, stale-base
//! conflicts, own operations left out of fetches), and a host that records
//! events. The reference server itself is exercised by the integration tests.

use std::cell::RefCell;
use std::rc::Rc;

use super::*;
use crate::state::STATE_KEY;
use crate::wire::ServerConflict;

/// The reference server's rules, in memory.
#[derive(Default)]
struct Server {
    log: Vec<Operation>,
    page_size: usize,
    /// Store the next push but answer with an error (a lost response).
    lose_next_answer: bool,
    /// Operations the next fetch returns verbatim (to test validation).
    inject: Vec<Value>,
    /// Advertise and apply patched updates, as the reference server does.
    applies_patches: bool,
    /// Answer every patch with `patch_rejected` (the server's copy differs).
    refuses_patches: bool,
    /// Every operation pushed, as it arrived.
    received: Vec<Operation>,
    /// Accepted patched updates as pushed, by operation id, served to
    /// fetches that ask for patches.
    patched: Vec<Operation>,
    /// Serve patches even to fetches that ask for whole stories (a broken server).
    forces_patches: bool,
    /// Fetches, and patched updates served.
    fetches: usize,
    patches_served: usize,
}

impl Server {
    fn latest_version(&self, story: &str) -> Option<u64> {
        self.log
            .iter()
            .rev()
            .find(|op| op.story_id == story)
            .and_then(|op| op.version)
    }

    /// The whole update a patched one stands for, when it applies to the
    /// story's latest version and gives the content hash it claims.
    fn unpatched(&self, op: &Operation) -> Option<Operation> {
        let latest = self.log.iter().rev().find(|s| s.story_id == op.story_id)?;
        if self.refuses_patches || latest.version != op.base_version {
            return None;
        }
        let mut whole = op.clone();
        let (patch, claimed) = crate::patch::detach(&mut whole)?;
        let claimed = claimed?;
        whole.data = Some(crate::patch::apply_checked(
            latest.data.as_ref()?,
            &patch,
            claimed.as_str()?,
        )?);
        Some(whole)
    }
}

struct Link {
    server: Rc<RefCell<Server>>,
}

impl Transport for Link {
    fn fetch(&mut self, device: &str, since: u64, patches: bool) -> Result<FetchPage, HostError> {
        let mut server = self.server.borrow_mut();
        server.fetches += 1;
        let mut operations: Vec<Value> = std::mem::take(&mut server.inject);
        let limit = if server.page_size == 0 {
            usize::MAX
        } else {
            server.page_size
        };
        let newer: Vec<&Operation> = server
            .log
            .iter()
            .filter(|op| op.version > Some(since))
            .collect();
        let page = &newer[..newer.len().min(limit)];
        let version = page
            .last()
            .map_or(server.log.len() as u64, |op| op.version.unwrap());
        let has_more = newer.len() > page.len();
        let mut served = 0;
        for op in page.iter().filter(|op| op.device_id != device) {
            let patched = server.patched.iter().find(|p| {
                p.id == op.id
                    && (patches || server.forces_patches)
                    && p.base_version.is_some_and(|base| base <= since)
            });
            served += usize::from(patched.is_some());
            let sent = patched.map_or_else(
                || (*op).clone(),
                |p| Operation {
                    version: op.version,
                    ..p.clone()
                },
            );
            operations.push(crate::state::operation_value(&sent).unwrap());
        }
        server.patches_served += served;
        Ok(FetchPage {
            operations,
            version,
            has_more,
            bytes_received: 0,
            accepts_patches: server.applies_patches,
        })
    }

    fn push(
        &mut self,
        _device: &str,
        operations: &[Operation],
        content: &mut ContentSource<'_>,
    ) -> Result<PushReply, HostError> {
        let mut server = self.server.borrow_mut();
        let mut reply = PushReply {
            success: true,
            ..PushReply::default()
        };
        for op in operations {
            server.received.push(op.clone());
            let mut op = op.clone();
            if needs_content(&op) {
                op.data = content(&op.story_id)?;
            }
            if op.extra.contains_key(PATCH) {
                match server.unpatched(&op) {
                    Some(whole) => {
                        server.patched.push(op.clone());
                        op = whole;
                    }
                    None => {
                        reply.success = false;
                        reply.conflicts.push(ServerConflict {
                            id: op.story_id.clone(),
                            conflict_type: PATCH_REJECTED.into(),
                            op_id: Some(op.id.clone()),
                            server_version: server.latest_version(&op.story_id),
                            extra: Map::new(),
                        });
                        continue;
                    }
                }
            }
            let op = &op;
            if let Some(stored) = server.log.iter().find(|s| s.id == op.id) {
                reply
                    .accepted
                    .push((op.id.clone(), stored.version.unwrap()));
                continue;
            }
            let latest = server.latest_version(&op.story_id);
            if let (Some(latest), Some(base)) = (latest, op.base_version) {
                if latest > base {
                    reply.success = false;
                    reply.conflicts.push(ServerConflict {
                        id: op.story_id.clone(),
                        conflict_type: "concurrent_modification".into(),
                        op_id: Some(op.id.clone()),
                        server_version: Some(latest),
                        extra: Map::new(),
                    });
                    continue;
                }
            }
            let version = server.log.len() as u64 + 1;
            server.log.push(Operation {
                version: Some(version),
                ..op.clone()
            });
            reply.accepted.push((op.id.clone(), version));
        }
        if std::mem::take(&mut server.lose_next_answer) {
            return Err(HostError("connection reset".into()));
        }
        Ok(reply)
    }
}

#[derive(Default)]
struct Recorder {
    events: Vec<String>,
    decision: Option<Decision>,
}

impl Host for Recorder {
    fn progress(&mut self, progress: Progress) {
        self.events
            .push(format!("progress:{}", progress.step.name()));
    }
    fn resolve(&mut self, _: &Conflict) -> Result<Option<Decision>, HostError> {
        Ok(self.decision.clone())
    }
    fn conflict_settled(&mut self, conflict: &Conflict, outcome: &Outcome, _: bool) {
        self.events
            .push(format!("conflict:{}:{outcome:?}", conflict.story_id));
    }
}

struct Device {
    engine: Engine,
    storage: MemoryStorage,
    state: StateManager<MemoryStore>,
    link: Link,
    host: Recorder,
}

impl Device {
    fn new(name: &str, server: &Rc<RefCell<Server>>, strategy: ConflictStrategy) -> Self {
        Device {
            engine: Engine::new(EngineConfig {
                device_id: name.into(),
                strategy,
                tracks_events: false,
            }),
            storage: MemoryStorage::default(),
            state: StateManager::open(MemoryStore::default()).unwrap(),
            link: Link {
                server: server.clone(),
            },
            host: Recorder::default(),
        }
    }

    fn sync(&mut self) -> Result<SyncReport, SyncError> {
        self.engine.sync(
            &mut self.storage,
            Some(&mut self.link),
            &mut self.state,
            &mut self.host,
        )
    }

    fn write(&mut self, id: &str, json: &str) {
        self.storage
            .stories
            .insert(id.into(), serde_json::from_str(json).unwrap());
    }

    fn story(&self, id: &str) -> Option<String> {
        self.storage
            .stories
            .get(id)
            .map(|v| v.to_canonical_json().unwrap())
    }
}

fn server() -> Rc<RefCell<Server>> {
    Rc::new(RefCell::new(Server::default()))
}

fn pushed(server: &Rc<RefCell<Server>>) -> usize {
    server.borrow().log.len()
}

#[test]
fn first_sync_pushes_every_story_and_the_other_device_receives_them() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("one", r#"{"title":"One"}"#);
    a.write("two", r#"{"title":"Two"}"#);
    assert_eq!(a.sync().unwrap().pushed, 2);
    let report = b.sync().unwrap();
    assert_eq!(report.applied, 2);
    assert_eq!(b.story("two").unwrap(), r#"{"title":"Two"}"#);
}

#[test]
fn a_sync_without_changes_pushes_nothing() {
    let s = server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    a.write("one", r#"{"title":"One"}"#);
    a.sync().unwrap();
    let report = a.sync().unwrap();
    assert_eq!((report.pushed, report.applied), (0, 0));
    assert_eq!(pushed(&s), 1);
}

#[test]
fn only_the_edited_story_is_pushed() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    for i in 0..10 {
        a.write(&format!("s{i}"), r#"{"title":"T"}"#);
    }
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s3", r#"{"title":"Edited"}"#);
    assert_eq!(a.sync().unwrap().pushed, 1);
    b.sync().unwrap();
    assert_eq!(b.story("s3").unwrap(), r#"{"title":"Edited"}"#);
    // b received s3 and must not echo it back.
    assert_eq!(b.sync().unwrap().pushed, 0);
    assert_eq!(pushed(&s), 11);
}

#[test]
fn deletes_propagate() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("gone", r#"{"title":"G"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.storage.stories.remove("gone");
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(b.story("gone"), None);
    assert_eq!(s.borrow().log.last().unwrap().op_type, OpType::Delete);
}

#[test]
fn concurrent_edits_settle_on_the_same_winner_everywhere() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("s", r#"{"title":"Base"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s", r#"{"title":"From A"}"#);
    b.write("s", r#"{"title":"From B"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.sync().unwrap();
    assert_eq!(a.story("s"), b.story("s"));
    assert!(b.host.events.iter().any(|e| e.starts_with("conflict:s:")));
}

#[test]
fn auto_merge_keeps_edits_to_different_fields() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::AutoMerge),
        Device::new("b", &s, ConflictStrategy::AutoMerge),
    );
    a.write("s", r#"{"title":"T","body":"B","tags":["x"]}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s", r#"{"title":"T by A","body":"B","tags":["x"]}"#);
    b.write("s", r#"{"title":"T","body":"B by B","tags":["x"]}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.sync().unwrap();
    let merged = r#"{"body":"B by B","tags":["x"],"title":"T by A"}"#;
    assert_eq!(a.story("s").unwrap(), merged);
    assert_eq!(b.story("s").unwrap(), merged);
}

#[test]
fn keep_both_keeps_both_versions_on_every_replica() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::KeepBoth),
        Device::new("b", &s, ConflictStrategy::KeepBoth),
    );
    a.write("s", r#"{"title":"Base"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s", r#"{"title":"A"}"#);
    b.write("s", r#"{"title":"B"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.sync().unwrap();
    assert_eq!(a.storage.stories, b.storage.stories);
    assert_eq!(a.storage.stories.len(), 2);
    let titles: Vec<String> = a
        .storage
        .stories
        .values()
        .map(|v| v.to_canonical_json().unwrap())
        .collect();
    assert!(
        titles.contains(&r#"{"title":"A"}"#.to_string())
            && titles.contains(&r#"{"title":"B"}"#.to_string())
    );
}

#[test]
fn manual_conflicts_without_a_resolver_wait_for_the_user() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::Manual),
        Device::new("b", &s, ConflictStrategy::Manual),
    );
    a.write("s", r#"{"title":"Base"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s", r#"{"title":"A"}"#);
    b.write("s", r#"{"title":"B"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(b.story("s").unwrap(), r#"{"title":"B"}"#);
    assert_eq!(b.state.conflicts().len(), 1);
    assert_eq!(b.sync().unwrap().pushed, 0, "a held story is not pushed");
    let outcome = b
        .engine
        .resolve_held("s", Decision::KeepLocal, &mut b.storage, &mut b.state)
        .unwrap();
    assert_eq!(outcome, Outcome::KeptLocal);
    assert!(b.state.conflicts().is_empty());
    assert_eq!(b.sync().unwrap().pushed, 1);
    a.sync().unwrap();
    assert_eq!(a.story("s").unwrap(), r#"{"title":"B"}"#);
}

#[test]
fn a_held_conflict_resolved_with_new_content_reaches_every_replica() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::Manual),
        Device::new("b", &s, ConflictStrategy::Manual),
    );
    a.write("s", r#"{"title":"Base"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s", r#"{"title":"A"}"#);
    b.write("s", r#"{"title":"B"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    let merged = serde_json::from_str(r#"{"title":"A and B"}"#).unwrap();
    b.engine
        .resolve_held(
            "s",
            Decision::Use(Some(merged)),
            &mut b.storage,
            &mut b.state,
        )
        .unwrap();
    assert_eq!(b.story("s").unwrap(), r#"{"title":"A and B"}"#);
    b.sync().unwrap();
    a.sync().unwrap();
    assert_eq!(a.story("s").unwrap(), r#"{"title":"A and B"}"#);
    let err = b
        .engine
        .resolve_held("s", Decision::KeepLocal, &mut b.storage, &mut b.state)
        .unwrap_err();
    assert_eq!(err.to_string(), "no unresolved conflict for story \"s\"");
}

#[test]
fn a_manual_resolver_decides() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::Manual),
        Device::new("b", &s, ConflictStrategy::Manual),
    );
    b.host.decision = Some(Decision::Use(Some(
        serde_json::from_str(r#"{"title":"Both"}"#).unwrap(),
    )));
    a.write("s", r#"{"title":"Base"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s", r#"{"title":"A"}"#);
    b.write("s", r#"{"title":"B"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.sync().unwrap();
    assert_eq!(a.story("s").unwrap(), r#"{"title":"Both"}"#);
    assert_eq!(b.story("s").unwrap(), r#"{"title":"Both"}"#);
}

#[test]
fn own_operations_are_not_remote_changes() {
    let s = server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    a.write("s", r#"{"title":"Mine"}"#);
    a.sync().unwrap();
    let mut echo = s.borrow().log[0].clone();
    echo.data = Some(serde_json::from_str(r#"{"title":"Echo"}"#).unwrap());
    s.borrow_mut()
        .inject
        .push(crate::state::operation_value(&echo).unwrap());
    a.sync().unwrap();
    assert_eq!(a.story("s").unwrap(), r#"{"title":"Mine"}"#);
}

#[test]
fn a_lost_push_answer_neither_loses_nor_duplicates() {
    let s = server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    a.write("s", r#"{"title":"Once"}"#);
    s.borrow_mut().lose_next_answer = true;
    assert!(a.sync().is_err());
    assert_eq!(a.state.pending_count(), 1, "the edit stays queued");
    a.sync().unwrap();
    assert_eq!(pushed(&s), 1, "the re-push was recognised");
    assert_eq!(a.state.pending_count(), 0);
    a.write("s", r#"{"title":"Twice"}"#);
    a.sync().unwrap();
    assert_eq!(pushed(&s), 2);
}

#[test]
fn an_acknowledgement_in_a_fetch_settles_a_queued_edit_without_a_second_push() {
    let s = server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    a.write("s", r#"{"title":"Once"}"#);
    s.borrow_mut().lose_next_answer = true;
    assert!(a.sync().is_err());
    // Transports that return this device's own operations acknowledge them so.
    let stored = s.borrow().log[0].clone();
    s.borrow_mut()
        .inject
        .push(crate::state::operation_value(&stored).unwrap());
    let report = a.sync().unwrap();
    assert_eq!(report.pushed, 0, "the fetch already settled it");
    assert_eq!(a.state.pending_count(), 0);
    assert_eq!(pushed(&s), 1);
}

#[test]
fn malformed_remote_operations_fail_the_sync_and_apply_nothing() {
    let s = server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    let bad = r#"{"id":"x","type":"create","story_id":"../../escape","data":{},"device_id":"evil","timestamp":1}"#;
    s.borrow_mut()
        .inject
        .push(serde_json::from_str(bad).unwrap());
    let err = a.sync().unwrap_err().to_string();
    assert_eq!(err, "invalid operation from server: operation 1: story id \"../../escape\" contains a path separator or '..'");
    assert!(a.storage.stories.is_empty());
    assert_eq!(a.state.server_version(), 0);
}

#[test]
fn a_storage_failure_is_reported_and_the_next_sync_recovers() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("s", r#"{"title":"T"}"#);
    a.sync().unwrap();
    b.storage.fail_saves = true;
    assert_eq!(
        b.sync().unwrap_err().to_string(),
        "storage save('s') failed: disk full"
    );
    b.storage.fail_saves = false;
    b.sync().unwrap();
    assert_eq!(b.story("s").unwrap(), r#"{"title":"T"}"#);
}

#[test]
fn metadata_only_changes_travel_as_metadata_updates() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("s", r#"{"title":"T","metadata":{"tags":["a"]}}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("s", r#"{"title":"T","metadata":{"tags":["b"]}}"#);
    a.sync().unwrap();
    let last = s.borrow().log.last().unwrap().clone();
    assert_eq!(last.op_type, OpType::MetadataUpdate);
    b.sync().unwrap();
    assert_eq!(
        b.story("s").unwrap(),
        r#"{"metadata":{"tags":["b"]},"title":"T"}"#
    );
    assert_eq!(b.sync().unwrap().pushed, 0);
}

#[test]
fn every_page_is_fetched() {
    let s = server();
    s.borrow_mut().page_size = 3;
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    for i in 0..10 {
        a.write(&format!("s{i}"), r#"{"n":1}"#);
    }
    a.sync().unwrap();
    assert_eq!(b.sync().unwrap().applied, 10);
    assert_eq!(b.state.server_version(), 10);
}

#[test]
fn state_is_recorded_under_the_reserved_key() {
    let s = server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    a.write("s", r#"{"title":"T"}"#);
    a.sync().unwrap();
    assert!(a.state.store().get(STATE_KEY).is_some());
    assert_eq!(a.state.state().stats.total_syncs, 1);
}

#[test]
fn a_device_syncs_only_its_subset_and_widening_it_fetches_the_rest() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("chapter-1", r#"{"title":"One"}"#);
    a.write("chapter-2", r#"{"title":"Two"}"#);
    a.write("intro", r#"{"title":"Intro"}"#);
    a.sync().unwrap();
    b.engine
        .set_filter(StoryFilter::new(vec!["chapter-*".into()], vec![]).unwrap());
    b.write("notes", r#"{"title":"Private notes"}"#);
    b.sync().unwrap();
    let ids: Vec<&String> = b.storage.stories.keys().collect();
    assert_eq!(ids, ["chapter-1", "chapter-2", "notes"]);
    assert!(
        s.borrow().log.iter().all(|op| op.story_id != "notes"),
        "outside the subset: not pushed"
    );
    // Changes outside the subset keep staying away.
    a.write("intro", r#"{"title":"Intro, edited"}"#);
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(b.story("intro"), None);
    b.engine
        .set_filter(StoryFilter::new(vec!["chapter-*".into(), "intro".into()], vec![]).unwrap());
    b.sync().unwrap();
    assert_eq!(b.story("intro").unwrap(), r#"{"title":"Intro, edited"}"#);
    assert_eq!(b.sync().unwrap().pushed, 0);
}

#[test]
fn a_device_can_sync_by_tag() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("cave", r#"{"title":"Cave","tags":["published"]}"#);
    a.write(
        "tower",
        r#"{"title":"Tower","metadata":{"tags":["published","long"]}}"#,
    );
    a.write("draft", r#"{"title":"Draft","tags":["draft"]}"#);
    a.sync().unwrap();
    b.engine
        .set_filter(StoryFilter::new(vec![], vec!["published".into()]).unwrap());
    b.sync().unwrap();
    let ids: Vec<&String> = b.storage.stories.keys().collect();
    assert_eq!(ids, ["cave", "tower"]);
    // Deletes of stories it synced still reach it.
    a.storage.stories.remove("cave");
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(b.story("cave"), None);
}

/// Stories with an `updated_at` (as whisker-core's index keeps), counting reads.
#[derive(Default)]
struct TimedStorage {
    inner: MemoryStorage,
    times: BTreeMap<String, i64>,
    reads: usize,
}

impl TimedStorage {
    /// A save by another program: new content and `updated_at`, no event.
    fn edit(&mut self, id: &str, json: &str, time: i64) {
        self.inner
            .stories
            .insert(id.into(), serde_json::from_str(json).unwrap());
        self.times.insert(id.into(), time);
    }
}

impl Storage for TimedStorage {
    fn list(&mut self) -> Result<Vec<StoryEntry>, HostError> {
        let mut entries = self.inner.list()?;
        for entry in &mut entries {
            entry.updated_at = self.times.get(&entry.id).copied();
        }
        Ok(entries)
    }
    fn load(&mut self, id: &str) -> Result<Option<Value>, HostError> {
        self.reads += 1;
        self.inner.load(id)
    }
    fn save(&mut self, id: &str, story: &Value) -> Result<(), HostError> {
        self.times.insert(id.into(), crate::protocol::now_seconds());
        self.inner.save(id, story)
    }
    fn delete(&mut self, id: &str) -> Result<(), HostError> {
        self.times.remove(id);
        self.inner.delete(id)
    }
    fn update_metadata(&mut self, id: &str, metadata: &Value) -> Result<bool, HostError> {
        self.inner.update_metadata(id, metadata)
    }
}

#[test]
fn edits_by_another_process_are_found_by_updated_at_and_unchanged_stories_are_not_read() {
    let s = server();
    let mut link = Link { server: s.clone() };
    let mut state = StateManager::open(MemoryStore::default()).unwrap();
    let mut host = Recorder::default();
    let mut engine = Engine::new(EngineConfig {
        device_id: "a".into(),
        // The storage emits events, but not for writes by other processes.
        strategy: ConflictStrategy::LastWriteWins,
        tracks_events: true,
    });
    let mut storage = TimedStorage::default();
    let old = crate::protocol::now_seconds() - 100;
    for i in 0..20 {
        storage.edit(&format!("s{i}"), r#"{"title":"T"}"#, old);
    }
    engine
        .sync(&mut storage, Some(&mut link), &mut state, &mut host)
        .unwrap();
    assert_eq!(
        storage.reads,
        20 + 20,
        "first sync: every story hashed and pushed"
    );
    storage.reads = 0;
    engine
        .sync(&mut storage, Some(&mut link), &mut state, &mut host)
        .unwrap();
    assert_eq!(storage.reads, 0, "unchanged updated_at: nothing read");
    storage.edit("s7", r#"{"title":"Edited elsewhere"}"#, old + 50);
    let report = engine
        .sync(&mut storage, Some(&mut link), &mut state, &mut host)
        .unwrap();
    assert_eq!(
        report.pushed, 1,
        "found on the very next sync, without an event"
    );
    assert_eq!(s.borrow().log.last().unwrap().story_id, "s7");
}

/// A story of `passages` passages of about 190 bytes each, the `edited` one
/// (if any) rewritten.
fn long_story(passages: usize, edited: Option<usize>) -> String {
    let list: Vec<String> = (0..passages)
        .map(|p| {
            let text = if Some(p) == edited {
                "One passage rewritten.".to_owned()
            } else {
                format!("Passage {p} of the long story. ").repeat(5)
            };
            format!(r#"{{"name":"P{p}","text":"{text}"}}"#)
        })
        .collect();
    format!(r#"{{"title":"Epic","passages":[{}]}}"#, list.join(","))
}

fn patching_server() -> Rc<RefCell<Server>> {
    let s = server();
    s.borrow_mut().applies_patches = true;
    s
}

#[test]
fn an_edited_large_story_goes_out_as_a_patch_and_arrives_whole() {
    let s = patching_server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("epic", &long_story(200, None));
    a.sync().unwrap();
    b.sync().unwrap();
    a.write("epic", &long_story(200, Some(120)));
    assert_eq!(a.sync().unwrap().pushed, 1);

    let sent = s.borrow().received.last().cloned().unwrap();
    assert_eq!(sent.data, None);
    let patch = serde_json::to_string(&sent.extra[PATCH]).unwrap();
    assert_eq!(
        patch,
        r#"[{"op":"replace","path":"/passages/120/text","value":"One passage rewritten."}]"#
    );
    assert_eq!(b.sync().unwrap().applied, 1);
    assert_eq!(b.story("epic"), a.story("epic"));

    // The receiving device kept the base too: its own edit goes as a patch.
    b.write("epic", &long_story(200, Some(7)));
    b.sync().unwrap();
    assert!(s
        .borrow()
        .received
        .last()
        .unwrap()
        .extra
        .contains_key(PATCH));
    a.sync().unwrap();
    assert_eq!(a.story("epic"), b.story("epic"));
}

#[test]
fn a_refused_patch_is_sent_again_whole_in_the_same_sync() {
    let s = patching_server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    a.write("epic", &long_story(200, None));
    a.sync().unwrap();
    s.borrow_mut().refuses_patches = true;
    a.write("epic", &long_story(200, Some(3)));
    let report = a.sync().unwrap();
    assert_eq!(report.pushed, 1);
    let server = s.borrow();
    let [.., patched, whole] = server.received.as_slice() else {
        panic!("expected two pushes");
    };
    assert!(patched.extra.contains_key(PATCH));
    assert!(!whole.extra.contains_key(PATCH) && !whole.extra.contains_key(CONTENT_HASH));
    assert_eq!(
        server
            .log
            .last()
            .unwrap()
            .data
            .as_ref()
            .unwrap()
            .to_canonical_json()
            .unwrap(),
        a.story("epic").unwrap()
    );
    drop(server);
    assert!(a.state.pending_operations().is_empty());
}

#[test]
fn small_stories_and_servers_without_the_feature_get_whole_stories() {
    let s = patching_server();
    let mut a = Device::new("a", &s, ConflictStrategy::LastWriteWins);
    a.write("note", r#"{"title":"Short"}"#);
    a.sync().unwrap();
    a.write("note", r#"{"title":"Still short"}"#);
    a.sync().unwrap();
    assert!(!s
        .borrow()
        .received
        .last()
        .unwrap()
        .extra
        .contains_key(PATCH));

    let plain = server();
    let mut c = Device::new("c", &plain, ConflictStrategy::LastWriteWins);
    c.write("epic", &long_story(200, None));
    c.sync().unwrap();
    c.write("epic", &long_story(200, Some(1)));
    c.sync().unwrap();
    assert!(!plain
        .borrow()
        .received
        .last()
        .unwrap()
        .extra
        .contains_key(PATCH));
}

/// Two devices holding a long story, then `a` edits one passage and pushes
/// it. With `forget_bases`, `b` has lost its base snapshots before that.
fn long_story_edited_on_a(forget_bases: bool) -> (Rc<RefCell<Server>>, Device, Device) {
    let s = patching_server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("epic", &long_story(200, None));
    a.sync().unwrap();
    b.sync().unwrap();
    if forget_bases {
        for shard in 0..bases::SHARDS {
            let key = format!("{}{shard}", bases::BASE_KEY_PREFIX);
            b.state.store_mut().delete(&key).unwrap();
        }
    }
    a.write("epic", &long_story(200, Some(50)));
    a.sync().unwrap();
    (s, a, b)
}

#[test]
fn a_device_holding_the_base_receives_an_edit_as_a_patch() {
    let (s, a, mut b) = long_story_edited_on_a(false);
    let fetches = s.borrow().fetches;
    assert_eq!(b.sync().unwrap().applied, 1);
    assert_eq!(s.borrow().patches_served, 1);
    assert_eq!(s.borrow().fetches, fetches + 1, "no second fetch");
    assert_eq!(b.story("epic"), a.story("epic"));
}

#[test]
fn a_patch_against_a_base_this_device_lacks_is_fetched_again_whole() {
    let (s, a, mut b) = long_story_edited_on_a(true);
    let fetches = s.borrow().fetches;
    assert_eq!(b.sync().unwrap().applied, 1);
    assert_eq!(s.borrow().patches_served, 1);
    assert_eq!(s.borrow().fetches, fetches + 2, "the page again, whole");
    assert_eq!(b.story("epic"), a.story("epic"));
}

#[test]
fn a_server_that_keeps_sending_an_unusable_patch_fails_the_sync_and_changes_nothing() {
    let (s, a, mut b) = long_story_edited_on_a(true);
    let before = b.story("epic");
    s.borrow_mut().forces_patches = true;
    let error = b.sync().unwrap_err().to_string();
    assert!(error.contains("cannot apply"), "{error}");
    assert_eq!(b.story("epic"), before);
    s.borrow_mut().forces_patches = false;
    b.sync().unwrap();
    assert_eq!(b.story("epic"), a.story("epic"));
}

#[test]
fn a_push_right_after_the_last_fetch_moves_the_next_fetch_past_it() {
    let s = server();
    let (mut a, mut b) = (
        Device::new("a", &s, ConflictStrategy::LastWriteWins),
        Device::new("b", &s, ConflictStrategy::LastWriteWins),
    );
    a.write("one", r#"{"title":"One"}"#);
    a.write("two", r#"{"title":"Two"}"#);
    a.sync().unwrap();
    assert_eq!(a.state.server_version(), 2, "its own operations 1 and 2");

    // Another device's operation lands between a's fetch and a's push: a must
    // still fetch it, so its version stays before the gap.
    b.write("three", r#"{"title":"Three"}"#);
    b.sync().unwrap();
    a.write("one", r#"{"title":"One, edited"}"#);
    a.engine
        .sync(
            &mut a.storage,
            Some(&mut Interleaving {
                inner: &mut a.link,
                before_push: Some(Box::new(|| {
                    let mut other = Device::new("c", &s, ConflictStrategy::LastWriteWins);
                    other.write("four", r#"{"title":"Four"}"#);
                    other.sync().unwrap();
                })),
            }),
            &mut a.state,
            &mut a.host,
        )
        .unwrap();
    assert_eq!(a.state.server_version(), 3);
    a.sync().unwrap();
    assert_eq!(a.story("four").unwrap(), r#"{"title":"Four"}"#);
}

/// A link that runs something just before its first push.
struct Interleaving<'a> {
    inner: &'a mut Link,
    before_push: Option<Box<dyn FnOnce() + 'a>>,
}

impl Transport for Interleaving<'_> {
    fn fetch(&mut self, device: &str, since: u64, patches: bool) -> Result<FetchPage, HostError> {
        self.inner.fetch(device, since, patches)
    }

    fn push(
        &mut self,
        device: &str,
        operations: &[Operation],
        content: &mut ContentSource<'_>,
    ) -> Result<PushReply, HostError> {
        if let Some(run) = self.before_push.take() {
            run();
        }
        self.inner.push(device, operations, content)
    }
}
