//! Selective sync: which stories a device syncs.
//!
//! A filter admits a story when its id matches one of the patterns (`*` any
//! run of characters, `?` one character) or it carries one of the tags
//! (`tags` of the story, or of its `metadata`). A filter with neither
//! admits every story.

use std::collections::BTreeSet;

use crate::value::Value;

/// The subset of stories a device syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoryFilter {
    patterns: Vec<String>,
    tags: BTreeSet<String>,
}

impl StoryFilter {
    /// A filter from id patterns and tags; empty patterns and tags are refused.
    pub fn new(patterns: Vec<String>, tags: Vec<String>) -> Result<Self, String> {
        if let Some(bad) = patterns.iter().chain(&tags).find(|s| s.trim().is_empty()) {
            return Err(format!("selective sync: empty pattern or tag {bad:?}"));
        }
        Ok(StoryFilter {
            patterns,
            tags: tags.into_iter().collect(),
        })
    }

    /// Whether the filter admits every story.
    pub fn is_everything(&self) -> bool {
        self.patterns.is_empty() && self.tags.is_empty()
    }

    /// Whether a story is admitted by its id alone: `Some(true)` when a
    /// pattern matches (or there is no filter), `Some(false)` when nothing
    /// could admit it, `None` when its tags decide.
    pub fn admits_id(&self, id: &str) -> Option<bool> {
        if self.is_everything() || self.patterns.iter().any(|p| glob_match(p, id)) {
            return Some(true);
        }
        if self.tags.is_empty() {
            return Some(false);
        }
        None
    }

    /// Whether a story with these tags is admitted (after [`admits_id`](Self::admits_id) said `None`).
    pub fn admits_tags<'a>(&self, tags: impl IntoIterator<Item = &'a str>) -> bool {
        tags.into_iter().any(|tag| self.tags.contains(tag))
    }

    /// Whether the story `id` with content `story` is admitted.
    pub fn admits(&self, id: &str, story: Option<&Value>) -> bool {
        match self.admits_id(id) {
            Some(admitted) => admitted,
            None => story.is_some_and(|story| self.admits_tags(story_tags(story))),
        }
    }

    /// A stable description, to notice when the filter changed between runs.
    pub fn fingerprint(&self) -> String {
        let mut patterns = self.patterns.clone();
        patterns.sort();
        format!(
            "stories={};tags={}",
            patterns.join(","),
            self.tags.iter().cloned().collect::<Vec<_>>().join(",")
        )
    }
}

/// The tags of a story: its `tags` and its `metadata.tags` (strings only).
pub fn story_tags(story: &Value) -> impl Iterator<Item = &str> {
    let lists = [
        story.get("tags"),
        story.get("metadata").and_then(|m| m.get("tags")),
    ];
    lists
        .into_iter()
        .flatten()
        .filter_map(|list| match list {
            Value::Array(items) => Some(items.iter()),
            _ => None,
        })
        .flatten()
        .filter_map(Value::as_str)
}

/// `*` matches any run of characters, `?` any one; everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point for the last `*`.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shells() {
        assert!(glob_match("chapter-*", "chapter-12"));
        assert!(glob_match("*", ""));
        assert!(glob_match("c?ve", "cave"));
        assert!(glob_match("*-draft-*", "x-draft-y-draft-z"));
        assert!(!glob_match("chapter-*", "intro"));
        assert!(!glob_match("c?ve", "crave"));
        assert!(glob_match("exact", "exact"));
    }

    #[test]
    fn ids_or_tags_admit_a_story() {
        let filter = StoryFilter::new(vec!["intro".into()], vec!["published".into()]).unwrap();
        let story: Value = serde_json::from_str(r#"{"metadata":{"tags":["published"]}}"#).unwrap();
        let draft: Value = serde_json::from_str(r#"{"tags":["draft"]}"#).unwrap();
        assert!(filter.admits("intro", None));
        assert!(filter.admits("cave", Some(&story)));
        assert!(!filter.admits("cave", Some(&draft)));
        assert!(!filter.admits("cave", None));
        assert!(StoryFilter::default().admits("anything", None));
        assert_eq!(
            StoryFilter::new(vec![" ".into()], vec![]).unwrap_err(),
            "selective sync: empty pattern or tag \" \""
        );
    }

    #[test]
    fn fingerprints_ignore_order() {
        let a =
            StoryFilter::new(vec!["b*".into(), "a*".into()], vec!["y".into(), "x".into()]).unwrap();
        let b =
            StoryFilter::new(vec!["a*".into(), "b*".into()], vec!["x".into(), "y".into()]).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
