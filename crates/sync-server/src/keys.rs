//! API keys: generation, hashing and comparison.
//!
//! Keys are 256 random bits from the OS, so a single SHA-256 is enough to store
//! them safely (no password-style stretching needed: there is nothing to guess).
//! Only the hash is stored; the key is shown once when it is created.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// SHA-256 of a key.
pub type KeyHash = [u8; 32];

/// Prefix of generated keys, so secret scanners and people can recognise them.
const KEY_PREFIX: &str = "wsk_";
const MIN_CHOSEN_KEY_LEN: usize = 8;
const MAX_KEY_LEN: usize = 512;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("the OS random number generator failed: {0}")]
    Entropy(getrandom::Error),
    #[error("a key must be {MIN_CHOSEN_KEY_LEN} to {MAX_KEY_LEN} printable ASCII characters without spaces")]
    BadChosenKey,
}

/// A new random key: `wsk_` and 64 hex digits.
pub fn generate() -> Result<String, KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(KeyError::Entropy)?;
    let mut key = String::with_capacity(KEY_PREFIX.len() + 64);
    key.push_str(KEY_PREFIX);
    for b in bytes {
        key.push_str(&format!("{b:02x}"));
    }
    Ok(key)
}

/// Checks a caller-chosen key (`keys add --key`).
pub fn check_chosen(key: &str) -> Result<(), KeyError> {
    let printable = key.bytes().all(|b| b.is_ascii_graphic());
    if printable && (MIN_CHOSEN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        Ok(())
    } else {
        Err(KeyError::BadChosenKey)
    }
}

pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two hashes.
pub fn hashes_match(a: &[u8], b: &KeyHash) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b.as_slice()))
}

/// The key in an `Authorization: Bearer <key>` header value.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_KEY_LEN)
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_well_formed() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == 68);
        assert!(check_chosen(&a).is_ok());
    }

    #[test]
    fn chosen_keys_must_be_printable_and_long_enough() {
        assert!(check_chosen("demo-key-1").is_ok());
        assert!(check_chosen("short").is_err());
        assert!(check_chosen("has space here").is_err());
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn hash_comparison() {
        let h = hash("k");
        assert!(hashes_match(&h, &hash("k")));
        assert!(!hashes_match(&h, &hash("j")));
        assert!(!hashes_match(&h[..31], &h));
    }
}
