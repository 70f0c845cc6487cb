//! The content of every story as last synced ("bases"), kept for three-way
//! merges and for telling metadata-only changes apart.
//!
//! Bases live in the state store in [`SHARDS`] records `_whisker_sync_base_<n>`,
//! a story's shard chosen by a hash of its id, so a sync that touches a few
//! stories rewrites a few small records. A base is used only when its content
//! hash matches the story's baseline, so a base written by a sync that then
//! failed to record its state is never mistaken for the synced version.
//!
//! A record holds its shard as JSON text under [`JSON_MEMBER`]: handing a
//! store one string costs far less than a table node per story node (a long
//! story's shard took a third of a sync's time as tables). Records written
//! as tables, and bases JSON cannot hold (NaN), are read and written as tables.

use std::collections::BTreeMap;

use crate::state::{StateManager, StateStore};
use crate::value::{Map, Value};

use super::{content_hash, HostError, SyncError};
use crate::patch::MIN_STORY_BYTES;

/// Number of base records.
pub const SHARDS: u32 = 16;
/// Prefix of base records; the shard number follows.
pub const BASE_KEY_PREFIX: &str = "_whisker_sync_base_";
/// Member of a base record holding the shard as JSON text (reserved: no story
/// id starts with `_`).
pub const JSON_MEMBER: &str = "_json";

/// Lazily loaded bases plus the changes of the current sync. Which stories
/// get one depends on what needs them: every story for three-way merges
/// (`all`), the stories large enough to be pushed as patches once the server
/// accepts patches (`patchable`), else none.
#[derive(Debug, Default)]
pub struct BaseStore {
    all: bool,
    patchable: bool,
    shards: BTreeMap<u32, Map>,
    updates: BTreeMap<String, Option<Value>>,
}

/// FNV-1a: stable across versions and platforms, which the shard choice must be.
fn shard_of(id: &str) -> u32 {
    let hash = id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % SHARDS
}

fn key(shard: u32) -> String {
    format!("{BASE_KEY_PREFIX}{shard}")
}

fn store_error(action: &str, shard: u32, e: impl std::fmt::Display) -> SyncError {
    SyncError::Bases(format!("cannot {action} `{}`: {e}", key(shard)))
}

impl BaseStore {
    /// A store keeping the base of every story when `all`, else none yet.
    pub fn new(all: bool) -> Self {
        BaseStore {
            all,
            ..BaseStore::default()
        }
    }

    /// Also keeps the bases of stories large enough to patch.
    pub fn keep_patchable(&mut self) {
        self.patchable = true;
    }

    /// Whether the base of a story is kept, `json_len` giving its size (asked
    /// only when that decides), so callers load only the content kept.
    pub fn wants(
        &self,
        json_len: impl FnOnce() -> Result<Option<usize>, HostError>,
    ) -> Result<bool, HostError> {
        Ok(self.all || (self.patchable && json_len()?.is_some_and(|len| len >= MIN_STORY_BYTES)))
    }

    fn shard<S: StateStore>(
        &mut self,
        state: &mut StateManager<S>,
        shard: u32,
    ) -> Result<&mut Map, SyncError> {
        if let std::collections::btree_map::Entry::Vacant(slot) = self.shards.entry(shard) {
            let loaded = match state
                .store_mut()
                .load(&key(shard))
                .map_err(|e| store_error("load", shard, e))?
            {
                Some(Value::Object(mut map)) => match map.remove(JSON_MEMBER) {
                    Some(Value::Str(text)) => {
                        serde_json::from_str(&text).map_err(|e| store_error("read", shard, e))?
                    }
                    _ => map,
                },
                _ => Map::new(),
            };
            slot.insert(loaded);
        }
        Ok(self.shards.get_mut(&shard).expect("loaded above"))
    }

    /// The base of `id` if it is the version whose content hash is `hash`.
    pub fn get<S: StateStore>(
        &mut self,
        state: &mut StateManager<S>,
        id: &str,
        hash: &str,
    ) -> Result<Option<Value>, SyncError> {
        let content = match self.updates.get(id) {
            Some(update) => update.clone(),
            None => self.shard(state, shard_of(id))?.get(id).cloned(),
        };
        Ok(content.filter(|c| content_hash(Some(c)) == hash))
    }

    /// Records the synced content of a story (`None`: it no longer exists).
    pub fn set(&mut self, id: &str, content: Option<Value>) {
        let kept =
            self.all || (self.patchable && content.as_ref().is_none_or(crate::patch::is_patchable));
        if kept {
            self.updates.insert(id.to_owned(), content);
        }
    }

    /// Writes the shards this sync changed.
    pub fn save<S: StateStore>(&mut self, state: &mut StateManager<S>) -> Result<(), SyncError> {
        let mut by_shard: BTreeMap<u32, Vec<(String, Option<Value>)>> = BTreeMap::new();
        for (id, content) in std::mem::take(&mut self.updates) {
            by_shard
                .entry(shard_of(&id))
                .or_default()
                .push((id, content));
        }
        for (shard, updates) in by_shard {
            let map = self.shard(state, shard)?;
            for (id, content) in updates {
                match content {
                    Some(c) => map.insert(id, c),
                    None => map.remove(&id),
                };
            }
            let record = match serde_json::to_string(map) {
                Ok(text) => Value::Object(Map::from([(JSON_MEMBER.to_owned(), Value::Str(text))])),
                Err(_) => Value::Object(map.clone()),
            };
            state
                .store_mut()
                .save(&key(shard), &record)
                .map_err(|e| store_error("save", shard, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_survive_as_text_and_tables_written_before_still_read() {
        let story: Value = serde_json::from_str(r#"{"title":"T","n":[1,2.5,{}]}"#).unwrap();
        let hash = content_hash(Some(&story));
        let mut state = StateManager::open(crate::engine::MemoryStore::default()).unwrap();
        let mut bases = BaseStore::new(true);
        bases.set("s", Some(story.clone()));
        bases.save(&mut state).unwrap();
        let record = state.store().get(&key(shard_of("s"))).unwrap();
        assert!(matches!(record.get(JSON_MEMBER), Some(Value::Str(_))));
        assert_eq!(
            BaseStore::new(true).get(&mut state, "s", &hash).unwrap(),
            Some(story.clone())
        );

        let table = Value::Object(Map::from([("s".to_owned(), story.clone())]));
        state.store_mut().save(&key(shard_of("s")), &table).unwrap();
        assert_eq!(
            BaseStore::new(true).get(&mut state, "s", &hash).unwrap(),
            Some(story)
        );
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("story-1"), shard_of("story-1"));
        let used: std::collections::BTreeSet<u32> =
            (0..200).map(|i| shard_of(&format!("story-{i}"))).collect();
        assert_eq!(used.len(), SHARDS as usize);
    }
}
