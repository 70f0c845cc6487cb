//! In-memory stories and sync state, for programs without a storage of their
//! own to sync (tests, benchmarks, tools) and for storages with no backend
//! to persist sync state into.

use std::collections::BTreeMap;

use crate::state::{StateStore, StoreError};
use crate::value::Value;

use super::{HostError, Storage, StoryEntry};

/// Sync state kept in memory only (it lasts as long as its owner).
#[derive(Debug, Default)]
pub struct MemoryStore(BTreeMap<String, Value>);

impl MemoryStore {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }
}

impl StateStore for MemoryStore {
    fn load(&mut self, key: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.0.get(key).cloned())
    }

    fn save(&mut self, key: &str, value: &Value) -> Result<(), StoreError> {
        self.0.insert(key.to_owned(), value.clone());
        Ok(())
    }

    fn can_delete(&self) -> bool {
        true
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        self.0.remove(key);
        Ok(())
    }
}

/// Stories in memory, by id.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemoryStorage {
    pub stories: BTreeMap<String, Value>,
    /// Makes every save fail (to test recovery from storage failures).
    pub fail_saves: bool,
}

impl Storage for MemoryStorage {
    fn list(&mut self) -> Result<Vec<StoryEntry>, HostError> {
        Ok(self
            .stories
            .keys()
            .map(|id| StoryEntry {
                id: id.clone(),
                updated_at: None,
                tags: None,
            })
            .collect())
    }

    fn load(&mut self, id: &str) -> Result<Option<Value>, HostError> {
        Ok(self.stories.get(id).cloned())
    }

    fn save(&mut self, id: &str, story: &Value) -> Result<(), HostError> {
        if self.fail_saves {
            return Err(HostError(format!("storage save('{id}') failed: disk full")));
        }
        self.stories.insert(id.to_owned(), story.clone());
        Ok(())
    }

    fn delete(&mut self, id: &str) -> Result<(), HostError> {
        self.stories.remove(id);
        Ok(())
    }

    fn update_metadata(&mut self, _: &str, _: &Value) -> Result<bool, HostError> {
        Ok(false)
    }
}
