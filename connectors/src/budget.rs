//! One memory budget for every way in: the bytes of messages being received and not yet
//! durable (HTTP bodies, SMTP DATA, inbox files, IMAP messages) are reserved here first, and
//! released when the [`Reservation`] is dropped. Past the budget a source does not buffer
//! more: HTTP answers `503`, SMTP `451 4.3.1`, the inbox and the IMAP pickup leave the
//! message where it is and try again later. So a flood of large messages costs at most the
//! budget, not `connections x max size`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The shared budget; clones share one count.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    limit: usize,
    used: AtomicUsize,
}

/// A reservation would pass the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ingest memory budget of {limit} bytes is in use (asked for {wanted} more)")]
pub struct OverBudget {
    /// The budget.
    pub limit: usize,
    /// Bytes asked for.
    pub wanted: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    #[must_use]
    pub fn new(limit: usize) -> Budget {
        Budget {
            inner: Arc::new(Inner {
                limit,
                used: AtomicUsize::new(0),
            }),
        }
    }

    /// A budget nothing passes (tests, tools that take one message).
    #[must_use]
    pub fn unlimited() -> Budget {
        Budget::new(usize::MAX)
    }

    /// The budget in bytes.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes reserved now.
    #[must_use]
    pub fn in_use(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    /// Reserve `n` bytes, held until the reservation is dropped.
    ///
    /// # Errors
    /// [`OverBudget`] when fewer than `n` bytes are free; nothing is reserved then.
    pub fn reserve(&self, n: usize) -> Result<Reservation, OverBudget> {
        self.take(n)?;
        Ok(Reservation {
            budget: self.clone(),
            held: n,
        })
    }

    fn take(&self, n: usize) -> Result<(), OverBudget> {
        let over = OverBudget {
            limit: self.inner.limit,
            wanted: n,
        };
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= self.inner.limit)
            })
            .map(drop)
            .map_err(|_| over)
    }

    fn give_back(&self, n: usize) {
        self.inner.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("limit", &self.inner.limit)
            .field("in_use", &self.in_use())
            .finish()
    }
}

/// Bytes held against a [`Budget`]; given back on drop.
#[must_use = "the bytes are given back as soon as the reservation is dropped"]
pub struct Reservation {
    budget: Budget,
    held: usize,
}

impl Reservation {
    /// Bytes held.
    #[must_use]
    pub fn held(&self) -> usize {
        self.held
    }

    /// Hold at least `n` bytes in all (a body that grew while streaming).
    ///
    /// # Errors
    /// [`OverBudget`] when the growth does not fit; what is held stays held.
    pub fn grow_to(&mut self, n: usize) -> Result<(), OverBudget> {
        if n > self.held {
            self.budget.take(n - self.held)?;
            self.held = n;
        }
        Ok(())
    }
}

impl Reservation {
    /// Hold at most `n` bytes, giving the rest back (the message was stored or dropped).
    pub fn release_to(&mut self, n: usize) {
        if n < self.held {
            self.budget.give_back(self.held - n);
            self.held = n;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("held", &self.held)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_budget_and_give_back_on_drop() {
        let b = Budget::new(100);
        let a = b.reserve(60).unwrap();
        assert_eq!(b.reserve(50).unwrap_err().wanted, 50);
        let mut c = b.reserve(40).unwrap();
        assert_eq!(b.in_use(), 100);
        assert!(c.grow_to(41).is_err());
        assert_eq!(c.held(), 40, "a failed growth keeps what was held");
        drop(a);
        c.grow_to(90).unwrap();
        c.release_to(30);
        assert_eq!(b.in_use(), 30);
        c.grow_to(90).unwrap();
        assert_eq!(b.in_use(), 90);
        drop(c);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn many_threads_never_pass_the_budget() {
        let b = Budget::new(1000);
        let peak = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (b, peak) = (b.clone(), Arc::clone(&peak));
                s.spawn(move || {
                    for i in 0..2000 {
                        if let Ok(r) = b.reserve(100 + i % 200) {
                            peak.fetch_max(b.in_use(), Ordering::Relaxed);
                            drop(r);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 1000);
        assert_eq!(b.in_use(), 0);
    }
}
