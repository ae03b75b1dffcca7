//! Poison items: a file or mailbox message that fails again and again while others are
//! taken is set aside (with its reason) after a few tries, so it cannot hold up the rest
//! (the inbox folder and the IMAP pickup use this).
//!
//! A failure that only says "the log cannot take it now" ([`Failure::Retryable`]) may be
//! the log being down for everyone: such a failure counts again only when the log took
//! another item since this one last failed. A failure of the item itself
//! ([`Failure::Item`]) always counts.

use std::collections::HashMap;
use std::hash::Hash;

/// How an item failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The log could not take it now.
    Retryable,
    /// Something about this item (it cannot be read, the log refuses it as it is).
    Item,
}

/// What to do with an item that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it and try again later.
    Retry,
    /// Set it aside; the reason says how often and why.
    SetAside(String),
}

#[derive(Debug)]
struct Tried {
    count: u32,
    /// `successes` when this item last failed.
    successes_then: u64,
}

/// Failures per item.
#[derive(Debug)]
pub struct Tries<K> {
    max_attempts: u32,
    tries: HashMap<K, Tried>,
    successes: u64,
}

impl<K: Eq + Hash + Clone> Tries<K> {
    /// Items are set aside at their `max_attempts`-th counted failure (at least 1).
    #[must_use]
    pub fn new(max_attempts: u32) -> Tries<K> {
        Tries {
            max_attempts: max_attempts.max(1),
            tries: HashMap::new(),
            successes: 0,
        }
    }

    /// Counted failures of `key` so far (items that failed before go last in a scan).
    #[must_use]
    pub fn count(&self, key: &K) -> u32 {
        self.tries.get(key).map_or(0, |t| t.count)
    }

    /// `key` was taken.
    pub fn succeeded(&mut self, key: &K) {
        self.tries.remove(key);
        self.successes += 1;
    }

    /// `key` failed with `reason` (no patient data).
    pub fn failed(&mut self, key: &K, failure: Failure, reason: &str) -> Verdict {
        let successes = self.successes;
        let t = self.tries.entry(key.clone()).or_insert(Tried {
            count: 0,
            successes_then: successes,
        });
        if t.count == 0 || failure == Failure::Item || successes > t.successes_then {
            t.count += 1;
        }
        t.successes_then = successes;
        if t.count >= self.max_attempts {
            let count = t.count;
            self.tries.remove(key);
            Verdict::SetAside(format!(
                "set aside after {count} failed tries while other items were taken; last: {reason}"
            ))
        } else {
            Verdict::Retry
        }
    }

    /// Forget items no longer present (taken by hand, moved away).
    pub fn retain(&mut self, present: impl Fn(&K) -> bool) {
        self.tries.retain(|k, _| present(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_failing_while_others_pass_is_set_aside() {
        let mut t = Tries::new(3);
        assert_eq!(t.failed(&"bad", Failure::Retryable, "x"), Verdict::Retry);
        t.succeeded(&"good1");
        assert_eq!(t.failed(&"bad", Failure::Retryable, "x"), Verdict::Retry);
        t.succeeded(&"good2");
        assert!(matches!(
            t.failed(&"bad", Failure::Retryable, "too large"),
            Verdict::SetAside(r) if r.contains("3 failed tries") && r.contains("too large")
        ));
        assert_eq!(t.count(&"bad"), 0, "forgotten once set aside");
    }

    #[test]
    fn a_log_down_for_everyone_sets_nothing_aside() {
        let mut t = Tries::new(2);
        for _ in 0..10 {
            assert_eq!(t.failed(&"a", Failure::Retryable, "down"), Verdict::Retry);
            assert_eq!(t.failed(&"b", Failure::Retryable, "down"), Verdict::Retry);
        }
        assert_eq!(t.count(&"a"), 1);
    }

    #[test]
    fn failures_of_the_item_itself_always_count() {
        let mut t = Tries::new(2);
        assert_eq!(t.failed(&1, Failure::Item, "unreadable"), Verdict::Retry);
        assert!(matches!(
            t.failed(&1, Failure::Item, "unreadable"),
            Verdict::SetAside(_)
        ));
    }
}
