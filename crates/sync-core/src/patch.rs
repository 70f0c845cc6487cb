//! Field-level changes: an update to a large story can travel as an
//! [RFC 6902](https://www.rfc-editor.org/rfc/rfc6902) JSON Patch against the
//! version both sides already hold, instead of the whole story.
//!
//! The patch is computed here on [`Value`]s; applying one goes through the
//! `json-patch` crate (atomic: a failing patch leaves nothing half-applied).
//! Its own diff compares arrays index by index, so a passage inserted near the
//! start of a long passage list would become a replacement of every later
//! passage; [`diff`] trims the common head and tail of arrays first and sends
//! only the middle.

use thiserror::Error;

use crate::engine::{content_hash, CONTENT_HASH};
use crate::protocol::{OpType, Operation};
use crate::value::{Map, Value};

/// Member of an update operation carrying a patch instead of `data`, and the
/// name of the server feature that accepts such operations.
pub const PATCH: &str = "patch";

/// Smallest story, in bytes of JSON, worth patching: below it the whole story
/// costs little more than a patch's envelope.
pub const MIN_STORY_BYTES: usize = 4096;

#[derive(Debug, Error, PartialEq)]
pub enum PatchError {
    #[error("the patch is not a JSON Patch document: {0}")]
    Malformed(String),
    #[error("the patch does not apply: {0}")]
    Inapplicable(String),
    #[error("the story is not plain JSON: {0}")]
    NotJson(String),
}

/// The patch turning `base` into `target`, as a list of RFC 6902 operations
/// (`add`, `remove`, `replace`); empty when they are equal.
pub fn diff(base: &Value, target: &Value) -> Vec<Value> {
    let mut operations = Vec::new();
    diff_at(base, target, &mut String::new(), &mut operations);
    operations
}

/// The patch turning `base` into `target` when it is worth sending: `target`
/// is at least [`MIN_STORY_BYTES`] of JSON and the patch at most half its
/// size. Never an empty patch: Lua encoders write an empty table as `{}`,
/// which is not a patch, so an unchanged story goes whole.
pub fn worthwhile(base: &Value, target: &Value) -> Option<Value> {
    let full = json_len(target).filter(|len| *len >= MIN_STORY_BYTES)?;
    let operations = diff(base, target);
    if operations.is_empty() {
        return None;
    }
    let patch = Value::Array(operations);
    json_len(&patch)
        .is_some_and(|len| len * 2 <= full)
        .then_some(patch)
}

/// Whether a story is large enough for patches to pay off (and plain JSON).
pub fn is_patchable(story: &Value) -> bool {
    json_len(story).is_some_and(|len| len >= MIN_STORY_BYTES)
}

/// `base` with `patch` applied.
pub fn apply(base: &Value, patch: &Value) -> Result<Value, PatchError> {
    let mut document =
        serde_json::to_value(base).map_err(|e| PatchError::NotJson(e.to_string()))?;
    let patch: json_patch::Patch = serde_json::to_value(patch)
        .and_then(serde_json::from_value)
        .map_err(|e| PatchError::Malformed(e.to_string()))?;
    json_patch::patch(&mut document, &patch)
        .map_err(|e| PatchError::Inapplicable(e.to_string()))?;
    serde_json::from_value(document).map_err(|e| PatchError::NotJson(e.to_string()))
}

/// `base` with `patch` applied, when that gives a story whose content hash is
/// `expected` (what a patched update claims for its result).
pub fn apply_checked(base: &Value, patch: &Value, expected: &str) -> Option<Value> {
    apply(base, patch)
        .ok()
        .filter(|story| content_hash(Some(story)) == expected)
}

/// Whether an operation carries a patch (member [`PATCH`]) instead of its
/// story's content.
pub fn is_patched(op: &Operation) -> bool {
    op.extra.contains_key(PATCH)
}

/// What is wrong with a patched update's shape, if anything: it must be an
/// update with a patch list, the version the patch applies to and the content
/// hash of its result, and no data.
pub fn shape_problem(op: &Operation) -> Option<&'static str> {
    if op.op_type != OpType::Update {
        Some("patch is only allowed on update operations")
    } else if op.data.is_some() {
        Some("an update with a patch must not also carry data")
    } else if op.base_version.is_none() {
        Some("an update with a patch needs base_version")
    } else if !matches!(op.extra.get(PATCH), Some(Value::Array(_))) {
        Some("patch must be an array")
    } else if !matches!(op.extra.get(CONTENT_HASH), Some(Value::Str(_))) {
        Some("an update with a patch needs a string content_hash")
    } else {
        None
    }
}

/// Takes a patched update's patch and the content hash it claims out of it
/// (`None`, and the operation untouched, when it carries no patch).
pub fn detach(op: &mut Operation) -> Option<(Value, Option<Value>)> {
    let patch = op.extra.remove(PATCH)?;
    Some((patch, op.extra.remove(CONTENT_HASH)))
}

/// Length of `value`'s JSON text, without building it; `None` when it is not
/// JSON (NaN, infinities).
pub fn json_len(value: &Value) -> Option<usize> {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).ok()?;
    Some(counter.0)
}

fn diff_at(base: &Value, target: &Value, path: &mut String, out: &mut Vec<Value>) {
    if base == target {
        return;
    }
    match (base, target) {
        (Value::Object(base), Value::Object(target)) => diff_objects(base, target, path, out),
        (Value::Array(base), Value::Array(target)) => diff_arrays(base, target, path, out),
        _ => out.push(operation("replace", path, Some(target))),
    }
}

fn diff_objects(base: &Map, target: &Map, path: &mut String, out: &mut Vec<Value>) {
    for key in base.keys().filter(|key| !target.contains_key(*key)) {
        with_token(path, key, |path| out.push(operation("remove", path, None)));
    }
    for (key, value) in target {
        with_token(path, key, |path| match base.get(key) {
            Some(old) => diff_at(old, value, path, out),
            None => out.push(operation("add", path, Some(value))),
        });
    }
}

/// Equal heads and tails are left alone. A middle of the same length on both
/// sides is compared element by element (edited passages); otherwise the old
/// middle is removed and the new one inserted.
fn diff_arrays(base: &[Value], target: &[Value], path: &mut String, out: &mut Vec<Value>) {
    let head = base.iter().zip(target).take_while(|(a, b)| a == b).count();
    let tail = base[head..]
        .iter()
        .rev()
        .zip(target[head..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (old, new) = (
        &base[head..base.len() - tail],
        &target[head..target.len() - tail],
    );
    if old.len() == new.len() {
        for (offset, (a, b)) in old.iter().zip(new).enumerate() {
            with_token(path, &(head + offset).to_string(), |path| {
                diff_at(a, b, path, out)
            });
        }
        return;
    }
    with_token(path, &head.to_string(), |path| {
        out.extend(old.iter().map(|_| operation("remove", path, None)));
    });
    for (offset, value) in new.iter().enumerate() {
        with_token(path, &(head + offset).to_string(), |path| {
            out.push(operation("add", path, Some(value)))
        });
    }
}

/// Runs `f` with `token` appended to the JSON Pointer `path` (escaped as
/// RFC 6901 says), then restores `path`.
fn with_token(path: &mut String, token: &str, f: impl FnOnce(&mut String)) {
    let len = path.len();
    path.push('/');
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
    f(path);
    path.truncate(len);
}

fn operation(op: &str, path: &str, value: Option<&Value>) -> Value {
    let mut map = Map::new();
    map.insert("op".to_owned(), op.into());
    map.insert("path".to_owned(), path.into());
    if let Some(value) = value {
        map.insert("value".to_owned(), value.clone());
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn story(passages: usize) -> Value {
        written(passages, "Words of the passage. ")
    }

    fn written(passages: usize, words: &str) -> Value {
        let list = (0..passages)
            .map(|p| {
                json(&format!(
                    r#"{{"name":"Passage {p}","text":"{}","links":["Passage {}"]}}"#,
                    words.repeat(8),
                    p + 1
                ))
            })
            .collect();
        let mut map = Map::new();
        map.insert("title".into(), "Epic".into());
        map.insert("passages".into(), Value::Array(list));
        Value::Object(map)
    }

    fn passages(story: &mut Value) -> &mut Vec<Value> {
        match story {
            Value::Object(map) => match map.get_mut("passages") {
                Some(Value::Array(list)) => list,
                _ => unreachable!(),
            },
            _ => unreachable!(),
        }
    }

    #[test]
    fn one_edited_passage_is_one_replace() {
        let base = story(500);
        let mut target = base.clone();
        if let Value::Object(passage) = &mut passages(&mut target)[249] {
            passage.insert("text".into(), "One passage rewritten.".into());
        }
        let patch = worthwhile(&base, &target).expect("a small patch");
        assert_eq!(
            patch,
            json(
                r#"[{"op":"replace","path":"/passages/249/text","value":"One passage rewritten."}]"#
            )
        );
        assert_eq!(apply(&base, &patch).unwrap(), target);
    }

    #[test]
    fn an_inserted_passage_is_one_add_not_a_shift_of_every_later_one() {
        let base = story(500);
        let mut target = base.clone();
        passages(&mut target).insert(3, json(r#"{"name":"New"}"#));
        let patch = diff(&base, &target);
        assert_eq!(
            patch,
            vec![json(
                r#"{"op":"add","path":"/passages/3","value":{"name":"New"}}"#
            )]
        );
        assert_eq!(apply(&base, &Value::Array(patch)).unwrap(), target);
    }

    #[test]
    fn keys_needing_escapes_and_removed_members_round_trip() {
        let base = json(r#"{"a/b":1,"c~d":{"x":1},"gone":true}"#);
        let target = json(r#"{"a/b":2,"c~d":{"x":1,"y":[1,2]}}"#);
        let patch = Value::Array(diff(&base, &target));
        assert_eq!(
            patch,
            json(
                r#"[{"op":"remove","path":"/gone"},
                    {"op":"replace","path":"/a~1b","value":2},
                    {"op":"add","path":"/c~0d/y","value":[1,2]}]"#
            )
        );
        assert_eq!(apply(&base, &patch).unwrap(), target);
    }

    #[test]
    fn small_stories_and_large_rewrites_go_whole() {
        let small = json(r#"{"title":"a"}"#);
        assert_eq!(worthwhile(&small, &json(r#"{"title":"b"}"#)), None);
        assert_eq!(worthwhile(&story(100), &story(100)), None);
        assert_eq!(worthwhile(&story(100), &written(100, "Rewritten. ")), None);
        assert!(is_patchable(&story(100)));
        assert!(!is_patchable(&small));
        assert!(!is_patchable(&Value::Float(f64::NAN)));
    }

    #[test]
    fn a_patch_that_does_not_fit_is_refused_whole() {
        let base = json(r#"{"list":[1]}"#);
        let patch = json(
            r#"[{"op":"replace","path":"/title","value":"x"},{"op":"remove","path":"/list/5"}]"#,
        );
        assert!(matches!(
            apply(&base, &patch),
            Err(PatchError::Inapplicable(_))
        ));
        assert!(matches!(
            apply(&base, &json(r#"{"op":"add"}"#)),
            Err(PatchError::Malformed(_))
        ));
    }

    fn document() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::Int),
            "[a-c~/]{0,3}".prop_map(Value::Str),
            any::<bool>().prop_map(Value::Bool),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-c~/]{1,2}", inner, 0..6).prop_map(Value::Object),
            ]
        })
    }

    proptest! {
        #[test]
        fn applying_the_diff_gives_the_target(base in document(), target in document()) {
            let patch = Value::Array(diff(&base, &target));
            prop_assert_eq!(apply(&base, &patch).unwrap(), target);
        }
    }
}
