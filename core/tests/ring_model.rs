//! Model test: the ring against a `VecDeque` reference under random
//! push / begin / commit / rollback sequences of both classes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;

use elkeid_core::packet::record_entry_len;
use elkeid_core::ring::{Batch, Class, Ring, RingConfig};
use proptest::prelude::*;

const N: usize = 16;

#[derive(Debug, Clone)]
enum Op {
    Push(Class, usize),
    Begin(usize, usize),
    Commit,
    Rollback,
}

fn op() -> impl Strategy<Value = Op> {
    let class = prop_oneof![Just(Class::Plugin), Just(Class::Agent)];
    prop_oneof![
        6 => (class, prop_oneof![0usize..4, 1usize..80, 60usize..300]).prop_map(|(c, l)| Op::Push(c, l)),
        2 => (0usize..8, 0usize..400).prop_map(|(r, b)| Op::Begin(r, b)),
        2 => Just(Op::Commit),
        1 => Just(Op::Rollback),
    ]
}

/// Distinct content per record so overlapping arena writes are caught.
fn content(id: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id as usize * 31 + i) as u8).collect()
}

fn check(ring: &Ring<N>, model: &VecDeque<(Class, Vec<u8>)>) {
    assert_eq!(ring.len(), model.len());
    assert_eq!(
        ring.bytes(),
        model.iter().map(|(_, r)| r.len()).sum::<usize>()
    );
    for c in [Class::Plugin, Class::Agent] {
        let (n, b) = model
            .iter()
            .filter(|(k, _)| *k == c)
            .fold((0, 0), |(n, b), (_, r)| (n + 1, b + r.len()));
        assert_eq!((ring.len_of(c), ring.bytes_of(c)), (n, b), "{c:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(768)))]

    #[test]
    fn ring_matches_model(
        budget in 0usize..1200,
        res_records in 0usize..6,
        res_bytes in 0usize..300,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let cfg = RingConfig { byte_budget: budget, agent_reserved_records: res_records, agent_reserved_bytes: res_bytes };
        let mut ring: Ring<N> = Ring::new(cfg);
        let reserve = res_bytes.min(budget);
        let main = budget - reserve;
        let mut model: VecDeque<(Class, Vec<u8>)> = VecDeque::new();
        let mut batch: Option<Batch> = None;
        let mut next_id = 0u32;

        for op in ops {
            match op {
                Op::Push(class, len) => {
                    let rec = content(next_id, len);
                    next_id += 1;
                    let room = ring.has_room(class, len);
                    let agents = model.iter().filter(|(c, _)| *c == Class::Agent).count();
                    let agent_bytes: usize = model.iter().filter(|(c, _)| *c == Class::Agent).map(|(_, r)| r.len()).sum();
                    let plugins = model.len() - agents;
                    // Reserve guarantees.
                    if class == Class::Agent && agents < res_records.max(1) && model.len() < N
                        && agent_bytes == 0 && (len <= reserve || (plugins == 0 && len <= main)) {
                        prop_assert!(room, "agent record refused: {} recs, len {}", model.len(), len);
                    }
                    if class == Class::Plugin && plugins == 0 && len <= main
                        && model.len() + 1 + res_records.min(N).saturating_sub(agents) <= N
                        && agent_bytes == 0 {
                        prop_assert!(room, "plugin record refused in an empty main region");
                    }
                    if class == Class::Plugin {
                        // Plugin records never use the held-back slots.
                        if model.len() + 1 + res_records.min(N).saturating_sub(agents) > N {
                            prop_assert!(!room);
                        }
                        prop_assert!(len <= main || !room);
                    }
                    if model.len() == N {
                        prop_assert!(!room);
                    }
                    let res = ring.push_encoded(class, &rec);
                    // has_room is exact.
                    prop_assert_eq!(res.is_ok(), room);
                    match res {
                        Ok(()) => model.push_back((class, rec)),
                        Err((_, back)) => prop_assert_eq!(back, &rec[..]),
                    }
                }
                Op::Begin(max_records, max_bytes) => {
                    let got = ring.begin_batch(max_records, max_bytes);
                    if batch.is_some() || model.is_empty() || max_records == 0 {
                        prop_assert!(got.is_none());
                        continue;
                    }
                    let b = got.unwrap();
                    // Expected: the longest prefix within both bounds, at least one.
                    let mut k = 0;
                    let mut bytes = 0;
                    while k < model.len().min(max_records) {
                        let e = record_entry_len(model[k].1.len());
                        if k > 0 && bytes + e > max_bytes { break; }
                        bytes += e;
                        k += 1;
                    }
                    prop_assert_eq!((b.len(), b.encoded_bytes()), (k, bytes));
                    let recs: Vec<&[u8]> = ring.batch_records(&b).collect();
                    prop_assert_eq!(recs.len(), k);
                    for (i, r) in recs.iter().enumerate() {
                        prop_assert_eq!(*r, &model[i].1[..], "record {} of batch", i);
                    }
                    prop_assert_eq!(ring.in_flight(), k);
                    batch = Some(b);
                }
                Op::Commit => {
                    if let Some(b) = batch.take() {
                        for _ in 0..b.len() {
                            model.pop_front();
                        }
                        ring.commit(b);
                        prop_assert_eq!(ring.in_flight(), 0);
                    }
                }
                Op::Rollback => {
                    if let Some(b) = batch.take() {
                        ring.rollback(b);
                        prop_assert_eq!(ring.in_flight(), 0);
                    }
                }
            }
            check(&ring, &model);
        }
        // Finally every stored record reads back intact, in order.
        if let Some(b) = batch.take() {
            ring.rollback(b);
        }
        if let Some(b) = ring.begin_batch(usize::MAX, usize::MAX) {
            let all: Vec<Vec<u8>> = ring.batch_records(&b).map(<[u8]>::to_vec).collect();
            let want: Vec<Vec<u8>> = model.iter().map(|(_, r)| r.clone()).collect();
            prop_assert_eq!(all, want);
            ring.commit(b);
        }
        prop_assert!(ring.is_empty());
        prop_assert_eq!(ring.bytes(), 0);
        // An empty ring takes a maximal record of either class again.
        if main > 0 && N > res_records {
            prop_assert!(ring.has_room(Class::Plugin, main));
        }
        prop_assert!(ring.has_room(Class::Agent, main.max(reserve)));
    }
}

/// Long random run against the default capacity and budget shape, with
/// records of about 200 bytes: record contents survive many wrap-arounds.
#[test]
fn long_run_default_capacity() {
    let cfg = RingConfig {
        byte_budget: 64 * 1024,
        agent_reserved_records: 16,
        agent_reserved_bytes: 4096,
    };
    let mut ring: Ring = Ring::new(cfg);
    let mut model: VecDeque<Vec<u8>> = VecDeque::new();
    let mut seed = 0x1234_5678_u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut id = 0;
    for _ in 0..20_000 {
        let r = rnd();
        if r % 3 != 0 {
            let len = 150 + (r >> 8) as usize % 100;
            let class = if r % 7 == 0 {
                Class::Agent
            } else {
                Class::Plugin
            };
            let rec = content(id, len);
            id += 1;
            if ring.push_encoded(class, &rec).is_ok() {
                model.push_back(rec);
            }
        } else if let Some(b) = ring.begin_batch((r >> 8) as usize % 300 + 1, 16 * 1024) {
            for (i, got) in ring.batch_records(&b).enumerate() {
                assert_eq!(got, &model[i][..]);
            }
            if r % 5 == 0 {
                ring.rollback(b);
            } else {
                for _ in 0..b.len() {
                    model.pop_front();
                }
                ring.commit(b);
            }
        }
        assert_eq!(ring.len(), model.len());
        assert_eq!(ring.bytes(), model.iter().map(Vec::len).sum::<usize>());
    }
}

/// `n` cases, or `PROPTEST_CASES` when set (CI lowers it for the suites it
/// runs under QEMU, where every case is emulated; the native run keeps `n`).
fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n)
}
