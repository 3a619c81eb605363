//! Random push / begin / commit / rollback sequences against a VecDeque
//! model: order, contents, byte accounting, and `has_room` exactness.
#![no_main]

use std::collections::VecDeque;

use elkeid_core::ring::{Batch, Class, Ring, RingConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [budget, res_rec, res_bytes, ops @ ..] = data else {
        return;
    };
    let cfg = RingConfig {
        byte_budget: usize::from(*budget) * 4,
        agent_reserved_records: usize::from(*res_rec % 4),
        agent_reserved_bytes: usize::from(*res_bytes),
    };
    let mut ring: Ring<8> = Ring::new(cfg);
    let mut model: VecDeque<Vec<u8>> = VecDeque::new();
    let mut batch: Option<Batch> = None;
    let mut id = 0u8;
    for pair in ops.chunks(2) {
        let (op, arg) = (pair[0], pair.get(1).copied().unwrap_or(0));
        match op % 4 {
            0 | 1 => {
                let class = if op & 0x80 != 0 {
                    Class::Agent
                } else {
                    Class::Plugin
                };
                id = id.wrapping_add(1);
                let rec = vec![id; usize::from(arg)];
                let room = ring.has_room(class, rec.len());
                assert_eq!(ring.push_encoded(class, &rec).is_ok(), room);
                if room {
                    model.push_back(rec);
                }
            }
            2 => {
                if let Some(b) = batch.take() {
                    if op & 0x80 != 0 {
                        ring.rollback(b);
                    } else {
                        for _ in 0..b.len() {
                            model.pop_front();
                        }
                        ring.commit(b);
                    }
                }
            }
            _ => {
                if batch.is_none() {
                    if let Some(b) = ring.begin_batch(usize::from(arg % 10), usize::from(arg) * 8) {
                        for (i, r) in ring.batch_records(&b).enumerate() {
                            assert_eq!(r, &model[i][..]);
                        }
                        batch = Some(b);
                    } else {
                        assert!(model.is_empty() || arg % 10 == 0);
                    }
                }
            }
        }
        assert_eq!(ring.len(), model.len());
        assert_eq!(ring.bytes(), model.iter().map(Vec::len).sum::<usize>());
    }
});
