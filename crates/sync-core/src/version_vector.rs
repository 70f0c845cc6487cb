//! Version vectors: one counter per device, compared as a partial order.
//!
//! A missing entry counts as 0, so `{a: 0}` and `{}` are the same vector.

use std::cmp::Ordering;
use std::collections::BTreeMap;

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The first happened before the second (every entry ≤, at least one <).
    Before,
    /// The first happened after the second.
    After,
    Concurrent,
}

impl Causality {
    pub fn as_str(self) -> &'static str {
        match self {
            Causality::Equal => "equal",
            Causality::Before => "before",
            Causality::After => "after",
            Causality::Concurrent => "concurrent",
        }
    }
}

/// Device id → counter.
#[derive(Debug, Clone, Default)]
pub struct VersionVector(BTreeMap<String, i64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, device: &str) -> i64 {
        self.0.get(device).copied().unwrap_or(0)
    }

    pub fn set(&mut self, device: impl Into<String>, version: i64) {
        self.0.insert(device.into(), version);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Compares entry by entry over the union of devices.
    pub fn compare(&self, other: &VersionVector) -> Causality {
        let (mut less, mut greater) = (false, false);
        for device in self.0.keys().chain(other.0.keys()) {
            match self.get(device).cmp(&other.get(device)) {
                Ordering::Less => less = true,
                Ordering::Greater => greater = true,
                Ordering::Equal => {}
            }
            if less && greater {
                return Causality::Concurrent;
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// Least upper bound: the entry-wise maximum. Commutative, associative, idempotent.
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut merged = self.clone();
        merged.merge_in(other);
        merged
    }

    /// Merges `other` into `self` in place.
    pub fn merge_in(&mut self, other: &VersionVector) {
        for (device, &version) in &other.0 {
            let entry = self.0.entry(device.clone()).or_insert(version);
            *entry = (*entry).max(version);
        }
    }
}

impl PartialEq for VersionVector {
    fn eq(&self, other: &Self) -> bool {
        self.compare(other) == Causality::Equal
    }
}

impl FromIterator<(String, i64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (String, i64)>>(iter: I) -> Self {
        VersionVector(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(&str, i64)]) -> VersionVector {
        entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn compare_covers_all_four_outcomes() {
        let a = vv(&[("d1", 1), ("d2", 2)]);
        assert_eq!(a.compare(&a.clone()), Causality::Equal);
        assert_eq!(a.compare(&vv(&[("d1", 2), ("d2", 2)])), Causality::Before);
        assert_eq!(a.compare(&vv(&[("d1", 1)])), Causality::After);
        assert_eq!(a.compare(&vv(&[("d1", 2), ("d2", 1)])), Causality::Concurrent);
    }

    #[test]
    fn missing_entries_are_zero() {
        assert_eq!(vv(&[("d1", 0)]).compare(&vv(&[])), Causality::Equal);
        assert_eq!(vv(&[]).compare(&vv(&[("d9", 1)])), Causality::Before);
    }

    #[test]
    fn merge_takes_the_maximum() {
        let merged = vv(&[("a", 3), ("b", 1)]).merge(&vv(&[("b", 4), ("c", 2)]));
        assert_eq!(merged, vv(&[("a", 3), ("b", 4), ("c", 2)]));
    }
}
