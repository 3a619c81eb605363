//! Reuses the send path's large buffers once the wire is done with them.
//!
//! A packet buffer (up to a few hundred KiB under a flood) is handed to the
//! delivery window as [`Bytes`] and lives until the center acknowledges it;
//! its snappy-framed copy lives until h2 has written it. Allocating a fresh
//! buffer for each would be free with glibc, whose heap keeps the pages, but
//! musl's allocator maps every allocation above 128 KiB and unmaps it on
//! free: every packet then page-faulted (and zeroed) its pages more than
//! once, about 40 % of the shipped agent's CPU per record under a flood
//! (docs/BENCHMARKS.md, "Buffer reuse on the send path").
//!
//! [`Recycler`] keeps a clone of the recent buffers it handed out. A clone
//! costs nothing while the window or h2 holds the buffer anyway; once every
//! other handle is gone (acknowledged, written), [`Recycler::take`] turns it
//! back into a `Vec` with its pages still resident. The clones it keeps
//! beyond that moment are bounded by `max_bytes`, and [`Recycler::clear`]
//! drops them when the ring goes idle.

use bytes::Bytes;

/// Recent buffers that may come back for reuse.
#[derive(Debug)]
pub(crate) struct Recycler {
    /// Handed-out buffers and their capacities.
    /// A `Vec`, oldest first: a few dozen entries at most, and no
    /// `VecDeque` code in a binary with a size budget.
    held: Vec<(Bytes, usize)>,
    held_bytes: usize,
    max_bytes: usize,
    /// Buffers reused / freshly allocated (tests).
    pub(crate) reused: u64,
    pub(crate) fresh: u64,
}

impl Recycler {
    /// Tracks at most `max_bytes` of buffers (their capacities) for reuse.
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            held: Vec::new(),
            held_bytes: 0,
            max_bytes,
            reused: 0,
            fresh: 0,
        }
    }

    /// An empty buffer with room for `cap` bytes: a tracked one nobody else
    /// holds any more if there is one large enough, else a new allocation
    /// with an eighth more room, so that it fits the next few requests of
    /// about the same size when it comes back.
    pub(crate) fn take(&mut self, cap: usize) -> Vec<u8> {
        let found = self
            .held
            .iter()
            .position(|(b, c)| *c >= cap && b.is_unique());
        if let Some(i) = found {
            let (b, c) = self.held.remove(i);
            self.held_bytes -= c;
            if let Ok(mut m) = b.try_into_mut() {
                // empty first: the conversion moves the contents to the
                // front of the allocation, a memmove of the whole packet
                m.clear();
                let v = Vec::from(m);
                if v.capacity() >= cap {
                    self.reused += 1;
                    return v;
                }
            }
        }
        self.fresh += 1;
        Vec::with_capacity(cap.saturating_add(cap / 8))
    }

    /// Freezes `buf` for the wire and keeps a clone for later reuse.
    pub(crate) fn hand_out(&mut self, buf: Vec<u8>) -> Bytes {
        let cap = buf.capacity();
        let b = Bytes::from(buf);
        if cap > self.max_bytes {
            return b;
        }
        // oldest first out; cap <= max_bytes, so this ends
        let mut drop_n = 0;
        let mut held_bytes = self.held_bytes;
        while held_bytes + cap > self.max_bytes && drop_n < self.held.len() {
            held_bytes -= self.held[drop_n].1;
            drop_n += 1;
        }
        self.held.drain(..drop_n);
        self.held_bytes = held_bytes + cap;
        self.held.push((b.clone(), cap));
        b
    }

    /// Drops every tracked clone (the ring went idle: RSS back down).
    pub(crate) fn clear(&mut self) {
        self.held.clear();
        self.held_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_only_after_every_other_handle_is_gone() {
        let mut r = Recycler::new(1 << 20);
        let mut v = r.take(1000);
        v.extend_from_slice(&[7u8; 900]);
        let ptr = v.as_ptr();
        let out = r.hand_out(v);
        let part = out.slice(10..20);
        // still on the wire: a new allocation, the bytes untouched
        let other = r.take(800);
        assert_ne!(other.as_ptr(), ptr);
        assert_eq!(out[0], 7);
        drop(out);
        let still = r.take(800);
        assert_ne!(still.as_ptr(), ptr, "a slice still holds it");
        drop(part);
        let back = r.take(800);
        assert_eq!(back.as_ptr(), ptr, "the same pages come back");
        assert!(back.is_empty() && back.capacity() >= 900);
        assert_eq!((r.reused, r.fresh), (1, 3));
    }

    #[test]
    fn held_bytes_are_bounded_and_clear_drops_them() {
        let mut r = Recycler::new(2500);
        let mut on_wire = Vec::new();
        for _ in 0..10 {
            let mut v = r.take(1000);
            v.resize(1000, 1);
            on_wire.push(r.hand_out(v));
        }
        assert_eq!((r.reused, r.fresh), (0, 10));
        assert!(r.held_bytes <= 2500 && r.held.len() == 2, "{r:?}");
        // larger than the bound: handed out, not kept
        drop(r.hand_out(vec![0; 3000]));
        assert_eq!(r.held.len(), 2);
        // the wire lets go: the same buffer serves request after request
        on_wire.clear();
        for _ in 0..5 {
            let mut v = r.take(1100);
            v.resize(1050, 2);
            drop(r.hand_out(v));
        }
        assert_eq!((r.reused, r.fresh), (5, 10));
        // too small for the request: a fresh buffer
        let big = r.take(5000);
        assert!(big.capacity() >= 5000);
        r.clear();
        assert_eq!((r.held.len(), r.held_bytes), (0, 0));
    }
}
