//! The engine's view of local stories during one sync: the content hash of
//! every story it looked at and, only once something needs it (a conflict, a
//! metadata update), the content itself.

use std::collections::BTreeMap;

use crate::value::Value;

use super::{content_hash, Storage, SyncError};

#[derive(Debug, Default)]
pub(super) struct Local {
    hashes: BTreeMap<String, String>,
    contents: BTreeMap<String, Option<Value>>,
}

impl Local {
    /// Starts from the hashes a scan found.
    pub fn new(hashes: BTreeMap<String, String>) -> Self {
        Local {
            hashes,
            contents: BTreeMap::new(),
        }
    }

    /// The story's content hash (`"deleted"` when it does not exist).
    pub fn hash(&mut self, storage: &mut dyn Storage, id: &str) -> Result<String, SyncError> {
        if let Some(hash) = self.hashes.get(id) {
            return Ok(hash.clone());
        }
        let hash = storage.hash(id)?.unwrap_or_else(|| content_hash(None));
        self.hashes.insert(id.to_owned(), hash.clone());
        Ok(hash)
    }

    /// The story's content (`None` when it does not exist).
    pub fn content(
        &mut self,
        storage: &mut dyn Storage,
        id: &str,
    ) -> Result<Option<Value>, SyncError> {
        if let Some(content) = self.contents.get(id) {
            return Ok(content.clone());
        }
        let content = storage.load(id)?;
        self.contents.insert(id.to_owned(), content.clone());
        Ok(content)
    }

    /// Records that the engine wrote content hashing to `hash` (its content
    /// is read again if something needs it).
    pub fn applied(&mut self, id: &str, hash: String) {
        self.contents.remove(id);
        self.hashes.insert(id.to_owned(), hash);
    }

    /// Records what the engine just wrote to storage.
    pub fn set(&mut self, id: &str, content: Option<Value>) {
        self.hashes
            .insert(id.to_owned(), content_hash(content.as_ref()));
        self.contents.insert(id.to_owned(), content);
    }
}
