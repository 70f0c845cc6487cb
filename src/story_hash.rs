//! Content hashes of stories computed on their Lua tables in place, without
//! converting them to documents first: a sync hashes every story it looks at,
//! and most of them have not changed.
//!
//! The bytes hashed are exactly the canonical JSON `sync_core` hashes for the
//! converted document (same array/object rule as [`raw::to_value`], keys
//! sorted, serde_json's escaping and number formatting), so both paths give
//! the same [`content_hash`](sync_core::engine::content_hash); the specs and a
//! property test compare them. Anything unusual (NaN, a key that collides
//! once stringified, cycles, invalid UTF-8, functions) is left to the
//! document path, which hashes it or reports what is wrong with it.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::io::Write;

use mlua::ffi;
use sync_core::engine::{combine_hash, ContentHasher};
use sync_core::value::{integral, Value};

use crate::raw::{self, State, MAX_DEPTH};

/// The table cannot be hashed in place; convert it instead.
#[derive(Debug)]
pub(crate) struct NotInPlace;

impl From<std::io::Error> for NotInPlace {
    fn from(_: std::io::Error) -> Self {
        NotInPlace
    }
}

impl From<serde_json::Error> for NotInPlace {
    fn from(_: serde_json::Error) -> Self {
        NotInPlace
    }
}

const METADATA: &[u8] = b"metadata";

thread_local! {
    /// One buffer for every story hashed on the thread: a fresh one per story
    /// costs an allocation (and allocator upkeep) of the story's size.
    static SCRATCH: RefCell<ContentHasher> = RefCell::new(ContentHasher::new());
}

/// The content hash of the story table at `idx` (see `content_hash`), and
/// the length of the JSON it was computed from.
pub(crate) unsafe fn story_hash(state: State, idx: c_int) -> Result<(String, usize), NotInPlace> {
    let idx = ffi::lua_absindex(state, idx);
    if ffi::lua_type(state, idx) != ffi::LUA_TTABLE {
        return Err(NotInPlace);
    }
    raw::ensure_stack(state, 4).map_err(|_| NotInPlace)?;
    raw::push_bytes(state, METADATA);
    let has_metadata = ffi::lua_rawget(state, idx) != ffi::LUA_TNIL;
    let metadata = ffi::lua_gettop(state);
    let skip = has_metadata.then_some(METADATA);
    // Writing the story runs no Lua code, so nothing can re-enter this borrow.
    let result = SCRATCH.with_borrow_mut(|out| {
        // A hash given up part way leaves its text behind.
        out.reset();
        let mut writer = StoryWriter {
            state,
            out,
            path: Vec::new(),
            members: Vec::new(),
        };
        writer.value(idx, skip)?;
        let body = writer.out.digest();
        let hash = if has_metadata {
            writer.value(metadata, None)?;
            combine_hash(body, Some(writer.out.digest()))
        } else {
            combine_hash(body, None)
        };
        Ok((hash, writer.out.digested()))
    });
    ffi::lua_settop(state, metadata - 1);
    result
}

/// Writes `bytes` as a JSON string, escaped exactly as serde_json does.
fn write_string(out: &mut ContentHasher, bytes: &[u8]) -> Result<(), NotInPlace> {
    // Most text needs no escaping, and then serde_json writes it verbatim.
    // A fold without early exit, so that the check runs on whole vectors.
    let escaped = bytes.iter().fold(false, |seen, &b| {
        seen | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escaped {
        let text = std::str::from_utf8(bytes).map_err(|_| NotInPlace)?;
        serde_json::to_writer(&mut *out, text)?;
        return Ok(());
    }
    // ASCII, the usual case, is valid UTF-8 without the full check.
    if !bytes.is_ascii() {
        std::str::from_utf8(bytes).map_err(|_| NotInPlace)?;
    }
    out.write_all(b"\"")?;
    out.write_all(bytes)?;
    out.write_all(b"\"")?;
    Ok(())
}

/// Where an object member's value is: left on the stack by the walk, or at
/// an index of the table's array part.
enum Place {
    Slot(c_int),
    Index(usize),
}

/// An object member: its key as JSON text, and where its value is.
struct Member<'s> {
    name: Cow<'s, [u8]>,
    place: Place,
}

/// Writes one story's canonical JSON. Key names borrowed from Lua strings
/// (`'s`) stay valid while the story's tables are on the stack.
struct StoryWriter<'o, 's> {
    state: State,
    out: &'o mut ContentHasher,
    /// The tables being written, outermost first (a repeat is a cycle).
    path: Vec<*const c_void>,
    /// Members of the objects being written, innermost last: one buffer for
    /// the whole story instead of one allocation per object.
    members: Vec<Member<'s>>,
}

impl StoryWriter<'_, '_> {
    unsafe fn value(&mut self, idx: c_int, skip: Option<&[u8]>) -> Result<(), NotInPlace> {
        let (state, out) = (self.state, &mut *self.out);
        match ffi::lua_type(state, idx) {
            ffi::LUA_TBOOLEAN => {
                out.write_all(if ffi::lua_toboolean(state, idx) != 0 {
                    b"true"
                } else {
                    b"false"
                })?;
            }
            ffi::LUA_TNUMBER => match raw::number_at(state, idx) {
                Value::Int(i) => write!(out, "{i}")?,
                Value::Float(f) if !f.is_finite() => return Err(NotInPlace),
                // As `Value` serialises floats: integral ones within 2^53 as integers.
                Value::Float(f) => match integral(f) {
                    Some(i) if i.unsigned_abs() <= 1 << 53 => write!(out, "{i}")?,
                    _ => serde_json::to_writer(&mut *out, &f)?,
                },
                _ => return Err(NotInPlace),
            },
            ffi::LUA_TSTRING => write_string(out, raw::bytes(state, idx))?,
            ffi::LUA_TTABLE => self.table(idx, skip)?,
            _ => return Err(NotInPlace),
        }
        Ok(())
    }

    unsafe fn table(&mut self, idx: c_int, skip: Option<&[u8]>) -> Result<(), NotInPlace> {
        let identity = ffi::lua_topointer(self.state, idx);
        if self.path.contains(&identity) || self.path.len() >= MAX_DEPTH {
            return Err(NotInPlace);
        }
        let base = ffi::lua_gettop(self.state);
        let first_member = self.members.len();
        self.path.push(identity);
        let written = self.collect_members(idx).and_then(|(len, indexed)| {
            if self.members.len() == first_member && len > 0 && indexed == len {
                self.array(idx, len)
            } else {
                self.object(idx, len, first_member, skip)
            }
        });
        self.path.pop();
        self.members.truncate(first_member);
        ffi::lua_settop(self.state, base);
        written
    }

    /// Walks the table at `idx`, adding its members to `members` (all but
    /// the keys 1..border, which make it an array if they are all there is).
    /// Member values stay on the stack above the keys that keep their names
    /// alive, so writing them needs no second lookup. Returns the border and
    /// how many keys 1..border there are.
    unsafe fn collect_members(&mut self, idx: c_int) -> Result<(usize, usize), NotInPlace> {
        let state = self.state;
        raw::ensure_stack(state, 4).map_err(|_| NotInPlace)?;
        let len = ffi::lua_rawlen(state, idx);
        let mut indexed = 0;
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, idx) != 0 {
            let key = ffi::lua_gettop(state) - 1;
            let name = match ffi::lua_type(state, key) {
                ffi::LUA_TNUMBER => match raw::number_at(state, key) {
                    Value::Int(i) if i >= 1 && (i as u64) <= len as u64 => {
                        indexed += 1;
                        ffi::lua_settop(state, key);
                        continue;
                    }
                    Value::Int(i) => Cow::Owned(i.to_string().into_bytes()),
                    Value::Float(f) => Cow::Owned(f.to_string().into_bytes()),
                    _ => return Err(NotInPlace),
                },
                ffi::LUA_TSTRING => Cow::Borrowed(raw::bytes(state, key)),
                _ => return Err(NotInPlace),
            };
            self.members.push(Member {
                name,
                place: Place::Slot(key + 1),
            });
            raw::ensure_stack(state, 3).map_err(|_| NotInPlace)?;
            ffi::lua_pushvalue(state, key);
        }
        Ok((len, indexed))
    }

    unsafe fn array(&mut self, idx: c_int, len: usize) -> Result<(), NotInPlace> {
        self.out.write_all(b"[")?;
        for i in 1..=len {
            if i > 1 {
                self.out.write_all(b",")?;
            }
            ffi::lua_rawgeti(self.state, idx, i as _);
            let item = self.value(ffi::lua_gettop(self.state), None);
            ffi::lua_settop(self.state, -2);
            item?;
        }
        self.out.write_all(b"]")?;
        Ok(())
    }

    unsafe fn object(
        &mut self,
        idx: c_int,
        len: usize,
        first_member: usize,
        skip: Option<&[u8]>,
    ) -> Result<(), NotInPlace> {
        let state = self.state;
        for i in 1..=len {
            if ffi::lua_rawgeti(state, idx, i as _) != ffi::LUA_TNIL {
                self.members.push(Member {
                    name: Cow::Owned(i.to_string().into_bytes()),
                    place: Place::Index(i),
                });
            }
            ffi::lua_settop(state, -2);
        }
        let members = &mut self.members[first_member..];
        members.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        // Two keys with one text (1 and "1") would be one member of the document.
        if members.windows(2).any(|pair| pair[0].name == pair[1].name) {
            return Err(NotInPlace);
        }
        self.out.write_all(b"{")?;
        let mut first = true;
        for at in first_member..self.members.len() {
            let member = &self.members[at];
            if skip == Some(&*member.name) {
                continue;
            }
            if !first {
                self.out.write_all(b",")?;
            }
            first = false;
            write_string(self.out, &member.name)?;
            self.out.write_all(b":")?;
            match member.place {
                Place::Slot(slot) => self.value(slot, None)?,
                Place::Index(i) => {
                    ffi::lua_rawgeti(state, idx, i as _);
                    let item = self.value(ffi::lua_gettop(state), None);
                    ffi::lua_settop(state, -2);
                    item?;
                }
            }
        }
        self.out.write_all(b"}")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mlua::Lua;
    use proptest::prelude::*;
    use sync_core::engine::content_hash;

    use crate::raw;

    /// Lua source for a value: scalars of every kind the document model
    /// distinguishes, and tables with string, integer and float keys.
    fn lua_value(depth: u32) -> BoxedStrategy<String> {
        let scalar = prop_oneof![
            any::<bool>().prop_map(|b| b.to_string()),
            (-1000i64..1000).prop_map(|i| i.to_string()),
            prop_oneof![
                Just("0.5"),
                Just("-2.25"),
                Just("1e20"),
                Just("0.1"),
                Just("3.0"),
                Just("-0.0"),
                Just("2^53"),
                Just("2^60")
            ]
            .prop_map(str::to_owned),
            "[a-z \"\\\\\n\t\u{1}\u{7f}é中]{0,8}".prop_map(|s| format!("{s:?}")),
        ];
        if depth == 0 {
            return scalar.boxed();
        }
        let key = prop_oneof![
            "[a-z]{1,5}".prop_map(|k| format!("[{k:?}]")),
            (1i64..6).prop_map(|i| format!("[{i}]")),
            (-3i64..20).prop_map(|i| format!("[{i}]")),
            Just("[1.5]".to_owned()),
            Just("[\"metadata\"]".to_owned()),
        ];
        let table = prop_oneof![
            prop::collection::vec(lua_value(depth - 1), 0..5)
                .prop_map(|items| format!("{{{}}}", items.join(","))),
            prop::collection::vec((key, lua_value(depth - 1)), 0..6).prop_map(|members| {
                let fields: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ];
        prop_oneof![scalar, table].boxed()
    }

    #[test]
    fn a_typical_story_is_hashed_in_place() {
        let lua = Lua::new();
        let source = r#"return { title = "Cave", passages = { { name = "Start", text = "It is dark.\n", tags = {} } },
            sparse = { [1] = "a", [3] = "c" }, ratio = 0.25, count = 3.0, metadata = { tags = { "draft" } } }"#;
        let table: mlua::Value = lua.load(source).eval().unwrap();
        let mut hashes = (None, None);
        raw::with_stack(&lua, table, |state| unsafe {
            hashes = (
                super::story_hash(state, 1).ok().map(|(hash, _)| hash),
                raw::to_value(state, 1).ok(),
            );
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        let (in_place, document) = hashes;
        let expected = content_hash(Some(&document.unwrap()));
        assert!(expected.contains(':'), "the metadata is hashed apart");
        assert_eq!(in_place, Some(expected));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn hashing_in_place_matches_hashing_the_document(source in lua_value(3).prop_filter("a table", |s| s.starts_with('{'))) {
            let lua = Lua::new();
            let table: mlua::Value = lua.load(format!("return {source}")).eval().unwrap();
            let mut in_place = None;
            let mut document = None;
            raw::with_stack(&lua, table, |state| unsafe {
                in_place = super::story_hash(state, 1).ok();
                document = raw::to_value(state, 1).ok();
                Ok::<(), ()>(())
            })
            .unwrap()
            .unwrap();
            // Tables the document path cannot take are outside the property.
            if let (Some((hash, json_len)), Some(document)) = (in_place, document) {
                prop_assert_eq!(hash, content_hash(Some(&document)), "{}", source);
                // With metadata, its member name and separators are not hashed.
                if document.get("metadata").is_none() {
                    prop_assert_eq!(json_len, document.to_canonical_json().unwrap().len(), "{}", source);
                }
            }
        }
    }
}
