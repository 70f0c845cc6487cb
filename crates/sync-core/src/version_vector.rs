//! Version vectors: one counter per device, compared as a partial order.
//!
//! A missing entry counts as 0, so `{a: 0}` and `{}` are the same vector. The
//! algorithms are written once over the [`Versions`] trait so that they run on
//! [`VersionVector`] and, without copying, on vectors held elsewhere (Lua tables).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::convert::Infallible;

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

/// Read access to a version vector stored in any form.
pub trait Versions {
    type Error;
    /// Calls `f` for every stored entry.
    fn try_for_each(
        &self,
        f: impl FnMut(&[u8], i64) -> Result<(), Self::Error>,
    ) -> Result<(), Self::Error>;
    /// The counter for `device`, 0 when absent.
    fn get(&self, device: &[u8]) -> Result<i64, Self::Error>;
}

/// Compares entry by entry over the union of devices.
pub fn compare<E, A, B>(a: &A, b: &B) -> Result<Causality, E>
where
    A: Versions<Error = E>,
    B: Versions<Error = E>,
{
    let (mut less, mut greater) = (false, false);
    let mut note = |ordering: Ordering| match ordering {
        Ordering::Less => less = true,
        Ordering::Greater => greater = true,
        Ordering::Equal => {}
    };
    a.try_for_each(|device, x| {
        note(x.cmp(&b.get(device)?));
        Ok(())
    })?;
    b.try_for_each(|device, y| {
        note(a.get(device)?.cmp(&y));
        Ok(())
    })?;
    Ok(match (less, greater) {
        (false, false) => Causality::Equal,
        (true, false) => Causality::Before,
        (false, true) => Causality::After,
        (true, true) => Causality::Concurrent,
    })
}

/// Visits the entries of `b` that exceed `a`: applying each to a copy of `a`
/// gives the least upper bound (entry-wise maximum) of the two vectors.
pub fn merge_raises<E, A, B>(
    a: &A,
    b: &B,
    mut raise: impl FnMut(&[u8], i64) -> Result<(), E>,
) -> Result<(), E>
where
    A: Versions<Error = E>,
    B: Versions<Error = E>,
{
    b.try_for_each(|device, y| {
        if y > a.get(device)? {
            raise(device, y)?;
        }
        Ok(())
    })
}

/// Device id → counter.
#[derive(Debug, Clone, Default)]
pub struct VersionVector(BTreeMap<String, i64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, device: impl Into<String>, version: i64) {
        self.0.insert(device.into(), version);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let Ok(causality) = compare(self, other);
        causality
    }

    /// Least upper bound. Commutative, associative, idempotent.
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut merged = self.clone();
        let Ok(()) = merge_raises(self, other, |device, version| {
            merged.set(String::from_utf8_lossy(device), version);
            Ok::<(), Infallible>(())
        });
        merged
    }
}

impl Versions for VersionVector {
    type Error = Infallible;

    fn try_for_each(
        &self,
        mut f: impl FnMut(&[u8], i64) -> Result<(), Infallible>,
    ) -> Result<(), Infallible> {
        self.0.iter().try_for_each(|(k, v)| f(k.as_bytes(), *v))
    }

    fn get(&self, device: &[u8]) -> Result<i64, Infallible> {
        let version = std::str::from_utf8(device)
            .ok()
            .and_then(|d| self.0.get(d))
            .copied();
        Ok(version.unwrap_or(0))
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
    use proptest::prelude::*;

    fn vv(entries: &[(&str, i64)]) -> VersionVector {
        entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn compare_covers_all_four_outcomes() {
        let a = vv(&[("d1", 1), ("d2", 2)]);
        assert_eq!(a.compare(&a.clone()), Causality::Equal);
        assert_eq!(a.compare(&vv(&[("d1", 2), ("d2", 2)])), Causality::Before);
        assert_eq!(a.compare(&vv(&[("d1", 1)])), Causality::After);
        assert_eq!(
            a.compare(&vv(&[("d1", 2), ("d2", 1)])),
            Causality::Concurrent
        );
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

    fn vector() -> impl Strategy<Value = VersionVector> {
        prop::collection::btree_map("[a-e]", 0i64..6, 0..5).prop_map(VersionVector)
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in vector(), b in vector()) {
            prop_assert_eq!(a.merge(&b), b.merge(&a));
        }

        #[test]
        fn merge_is_associative(a in vector(), b in vector(), c in vector()) {
            prop_assert_eq!(a.merge(&b).merge(&c), a.merge(&b.merge(&c)));
        }

        #[test]
        fn merge_is_idempotent(a in vector(), b in vector()) {
            prop_assert_eq!(a.merge(&a), a.clone());
            let ab = a.merge(&b);
            prop_assert_eq!(ab.merge(&b), ab);
        }

        #[test]
        fn merge_is_the_least_upper_bound(a in vector(), b in vector(), c in vector()) {
            let ab = a.merge(&b);
            prop_assert!(matches!(a.compare(&ab), Causality::Before | Causality::Equal));
            prop_assert!(matches!(b.compare(&ab), Causality::Before | Causality::Equal));
            // Any common upper bound of a and b is also above their merge.
            let upper = ab.merge(&c);
            prop_assert!(matches!(ab.compare(&upper), Causality::Before | Causality::Equal));
        }

        #[test]
        fn compare_is_antisymmetric(a in vector(), b in vector()) {
            let expected = match a.compare(&b) {
                Causality::Before => Causality::After,
                Causality::After => Causality::Before,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), expected);
        }

        #[test]
        fn compare_is_a_partial_order(a in vector(), b in vector(), c in vector()) {
            prop_assert_eq!(a.compare(&a), Causality::Equal);
            let below = |x: &VersionVector, y: &VersionVector| {
                matches!(x.compare(y), Causality::Before | Causality::Equal)
            };
            if below(&a, &b) && below(&b, &c) {
                prop_assert!(below(&a, &c));
            }
        }

        #[test]
        fn concurrent_means_neither_is_below(a in vector(), b in vector()) {
            let concurrent = a.compare(&b) == Causality::Concurrent;
            let either_below = a.iter().all(|(d, x)| x <= b.get(d.as_bytes()).unwrap())
                || b.iter().all(|(d, y)| y <= a.get(d.as_bytes()).unwrap());
            prop_assert_eq!(concurrent, !either_below);
        }
    }
}
