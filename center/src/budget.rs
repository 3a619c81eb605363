//! Byte budgets shared by many holders: the stored heartbeat details of all
//! connections, the command queues (each agent's and all together) and the
//! task-result queue. A holder reserves bytes before it keeps something and
//! gives them back when the [`Reservation`] is dropped, so the memory a
//! budget covers can never exceed its limit, however many connections share
//! it.
//!
//! What is counted is an estimate of the heap bytes held ([`json_cost`] for
//! stored JSON, the encoded length for a queued `Command`), not an exact
//! allocator figure; it is proportional to what an agent or a client sends,
//! which is what has to be bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;

/// How often a budget that keeps refusing is logged.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(60);

/// A limit on bytes held by many holders at once.
#[derive(Debug)]
pub(crate) struct ByteBudget {
    limit: u64,
    used: AtomicU64,
    /// Mirrors `used` on `/metrics` (`None`: not exported).
    gauge: Option<Gauge>,
    /// Refusals since the last log line, and when that was (ms since `born`).
    refused_since_log: AtomicU64,
    last_log_ms: AtomicU64,
    born: Instant,
}

impl ByteBudget {
    /// A budget of `limit` bytes, its use exported through `gauge`.
    pub(crate) fn new(limit: u64, gauge: Option<Gauge>) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicU64::new(0),
            gauge,
            refused_since_log: AtomicU64::new(0),
            last_log_ms: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    /// The limit, bytes.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    fn try_add(&self, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok();
        if ok && let Some(g) = &self.gauge {
            g.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
        }
        ok
    }

    fn sub(&self, n: u64) {
        if n == 0 {
            return;
        }
        // Never below zero, even if a caller released more than it held.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
        if let Some(g) = &self.gauge {
            g.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Reserves `n` bytes; `None` when that would pass the limit.
    pub(crate) fn try_reserve(self: &Arc<Self>, n: u64) -> Option<Reservation> {
        self.try_add(n).then(|| Reservation {
            budget: self.clone(),
            bytes: n,
        })
    }

    /// An empty reservation, grown later with [`Reservation::resize`].
    pub(crate) fn empty(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Notes one refusal; returns how many refusals to report when a log
    /// line is due (at most one per [`LOG_EVERY`]), else `None`.
    pub(crate) fn refused(&self) -> Option<u64> {
        self.refused_since_log.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_log_ms.load(Ordering::Relaxed);
        let every = u64::try_from(LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        // The first refusal is logged at once, then one line per interval.
        let due = last == 0 || now.saturating_sub(last) >= every;
        if due
            && self
                .last_log_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.refused_since_log.swap(0, Ordering::Relaxed));
        }
        None
    }
}

/// Bytes held against a [`ByteBudget`]; given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl Reservation {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The budget this reservation holds bytes of.
    pub(crate) fn budget(&self) -> &ByteBudget {
        &self.budget
    }

    /// Changes the held amount to `bytes`; growing fails (nothing changes)
    /// when the budget cannot cover the difference.
    pub(crate) fn resize(&mut self, bytes: u64) -> bool {
        if bytes > self.bytes {
            if !self.budget.try_add(bytes - self.bytes) {
                return false;
            }
        } else {
            self.budget.sub(self.bytes - bytes);
        }
        self.bytes = bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.sub(self.bytes);
    }
}

/// Size of one `serde_json::Value` slot (enum tag + the largest variant).
const VALUE_SLOT: u64 = 32;
/// Per-entry share of a map's node overhead beside key and value.
const ENTRY_OVERHEAD: u64 = 32;

/// Estimated heap bytes of a JSON value as the center stores it: text
/// lengths plus a fixed cost per value and per map entry.
pub(crate) fn json_cost(v: &Value) -> u64 {
    match v {
        Value::String(s) => VALUE_SLOT + s.len() as u64,
        Value::Array(a) => VALUE_SLOT + a.iter().map(json_cost).sum::<u64>(),
        Value::Object(m) => VALUE_SLOT + map_cost(m),
        _ => VALUE_SLOT,
    }
}

/// [`json_cost`] of a map's entries.
pub(crate) fn map_cost(m: &serde_json::Map<String, Value>) -> u64 {
    m.iter()
        .map(|(k, v)| ENTRY_OVERHEAD + k.len() as u64 + json_cost(v))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_resize_release() {
        let g = Gauge::default();
        let b = ByteBudget::new(100, Some(g.clone()));
        let a = b.try_reserve(60).unwrap();
        assert!(b.try_reserve(41).is_none(), "over the limit");
        let mut c = b.try_reserve(40).unwrap();
        assert_eq!((b.used(), g.get()), (100, 100));
        assert!(!c.resize(41), "cannot grow past the limit");
        assert_eq!(c.bytes(), 40);
        assert!(c.resize(10));
        assert_eq!(b.used(), 70);
        drop(a);
        assert_eq!((b.used(), g.get()), (10, 10));
        assert!(c.resize(90));
        drop(c);
        assert_eq!((b.used(), g.get()), (0, 0));
        let mut e = b.empty();
        assert!(e.resize(100));
        assert!(b.try_reserve(1).is_none());
        assert_eq!(b.limit(), 100);
    }

    #[test]
    fn concurrent_holders_never_pass_the_limit() {
        let b = ByteBudget::new(1000, None);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..2000u64 {
                        if let Some(r) = b.try_reserve(1 + i % 37) {
                            held.push(r);
                        }
                        assert!(b.used() <= 1000);
                        if held.len() > 5 {
                            held.remove(0);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn refusals_are_logged_once_per_interval() {
        let b = ByteBudget::new(0, None);
        assert_eq!(b.refused(), Some(1), "the first refusal is reported");
        assert_eq!(b.refused(), None);
        assert_eq!(b.refused(), None);
        // After the interval: the two silent ones and this one.
        let born = Instant::now()
            .checked_sub(LOG_EVERY + Duration::from_secs(1))
            .unwrap();
        let b2 = ByteBudget {
            born,
            refused_since_log: AtomicU64::new(2),
            last_log_ms: AtomicU64::new(1),
            limit: 0,
            used: AtomicU64::new(0),
            gauge: None,
        };
        assert_eq!(b2.refused(), Some(3));
    }

    #[test]
    fn json_cost_grows_with_the_text() {
        let small: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"a":"x","n":1}"#).unwrap();
        let big: serde_json::Map<String, Value> =
            serde_json::from_str(&format!(r#"{{"a":"{}","n":1}}"#, "x".repeat(1000))).unwrap();
        assert_eq!(map_cost(&big) - map_cost(&small), 999);
        assert_eq!(map_cost(&small), (32 + 1 + 32 + 1) + (32 + 1 + 32));
    }
}
