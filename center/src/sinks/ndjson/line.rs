//! The NDJSON line encoder (the format is in the module docs of `ndjson`).
//!
//! Written straight into the output buffer, byte for byte what
//! `serde_json::to_writer` gives for the same line (the tests compare the
//! two):
//! - everything that is the same for every record of a packet (`svr_time`,
//!   host metadata, `tag`, the packet identity) is encoded once per packet
//!   ([`PacketJson`]), keys included;
//! - integers go through `itoa`, strings through [`escape`] (a copy when
//!   nothing needs escaping, which is the usual case);
//! - `fields`: the `Payload` entries are decoded once into an array on the
//!   stack (up to 16; more go through a `Vec`), sorted by key with a stable
//!   insertion sort (one pass when the producer already sorted them), and
//!   the last of each duplicate key is written, as the `BTreeMap` did: no
//!   map, no allocation per record.

use base64::Engine;
use elkeid_proto::grpc::EncodedRecord;

use super::super::PacketBatch;

/// The per-packet parts of every line of one batch, encoded once.
#[derive(Debug, Default)]
pub(crate) struct PacketJson {
    /// `,"svr_time":…,"agent_id":…,…,"tag":"…"`
    head: Vec<u8>,
    /// `,"agent_epoch":…,"agent_seq":…,"record_idx":` (identity only)
    id: Vec<u8>,
    /// `,"packet_records":…` (identity only)
    count: Vec<u8>,
    with_id: bool,
}

impl PacketJson {
    /// Encodes the shared parts of `batch`'s lines.
    pub(crate) fn new(batch: &PacketBatch) -> Self {
        let mut p = PacketJson::default();
        p.set(batch);
        p
    }

    /// Re-encodes for another batch, reusing the buffers.
    pub(crate) fn set(&mut self, batch: &PacketBatch) {
        let h = &mut self.head;
        h.clear();
        h.extend_from_slice(b",\"svr_time\":");
        int(h, batch.svr_time);
        for (key, v) in [
            (&b",\"agent_id\":"[..], &batch.agent_id),
            (b",\"hostname\":", &batch.hostname),
            (b",\"version\":", &batch.version),
            (b",\"product\":", &batch.product),
        ] {
            h.extend_from_slice(key);
            escape(h, v);
        }
        for (key, list) in [
            (&b",\"intranet_ipv4\":["[..], &batch.intranet_ipv4),
            (b",\"extranet_ipv4\":[", &batch.extranet_ipv4),
            (b",\"intranet_ipv6\":[", &batch.intranet_ipv6),
            (b",\"extranet_ipv6\":[", &batch.extranet_ipv6),
        ] {
            h.extend_from_slice(key);
            for (i, s) in list.iter().enumerate() {
                if i > 0 {
                    h.push(b',');
                }
                escape(h, s);
            }
            h.push(b']');
        }
        h.extend_from_slice(b",\"tag\":");
        escape(h, &batch.tag);
        self.id.clear();
        self.count.clear();
        self.with_id = false;
        if let Some(id) = batch.id {
            self.with_id = true;
            self.id.extend_from_slice(b",\"agent_epoch\":");
            int(&mut self.id, id.epoch);
            self.id.extend_from_slice(b",\"agent_seq\":");
            int(&mut self.id, id.seq);
            self.id.extend_from_slice(b",\"record_idx\":");
            self.count.extend_from_slice(b",\"packet_records\":");
            int(&mut self.count, batch.records.len());
        }
    }

    /// Appends the line of record `idx` (with its trailing `\n`) to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, idx: usize, rec: &EncodedRecord) {
        out.extend_from_slice(b"{\"data_type\":");
        int(out, rec.data_type);
        out.extend_from_slice(b",\"agent_time\":");
        int(out, rec.timestamp);
        out.extend_from_slice(&self.head);
        if self.with_id {
            out.extend_from_slice(&self.id);
            int(out, idx);
            out.extend_from_slice(&self.count);
        }
        fields(out, &rec.data);
        out.extend_from_slice(b"}\n");
    }
}

fn int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Entries sorted on the stack; a `Payload` with more goes through a `Vec`.
const STACK_ENTRIES: usize = 16;

/// `,"fields":{…}` or, for a body that is not a UTF-8 `Payload`,
/// `,"body":"<base64>"`.
fn fields(out: &mut Vec<u8>, data: &[u8]) {
    let mut kv: [(&[u8], &[u8]); STACK_ENTRIES] = [(&[], &[]); STACK_ENTRIES];
    let mut n = 0;
    for e in elkeid_core::payload::entries(data) {
        let Ok((k, v)) = e else {
            return body(out, data);
        };
        if std::str::from_utf8(k).is_err() || std::str::from_utf8(v).is_err() {
            return body(out, data);
        }
        let Some(slot) = kv.get_mut(n) else {
            return fields_many(out, data);
        };
        *slot = (k, v);
        n += 1;
    }
    let kv = &mut kv[..n];
    // Insertion sort: stable (duplicates keep their wire order), and one
    // pass when the producer already sorted its keys.
    for i in 1..kv.len() {
        let mut j = i;
        while j > 0 && kv[j - 1].0 > kv[j].0 {
            kv.swap(j - 1, j);
            j -= 1;
        }
    }
    write_sorted(out, kv);
}

/// [`fields`] for a `Payload` of more than [`STACK_ENTRIES`] entries.
fn fields_many(out: &mut Vec<u8>, data: &[u8]) {
    let Ok(pairs) = elkeid_core::payload::decode_utf8(data) else {
        return body(out, data);
    };
    let mut kv: Vec<(&[u8], &[u8])> = pairs
        .into_iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    kv.sort_by(|a, b| a.0.cmp(b.0));
    write_sorted(out, &kv);
}

/// Writes entries sorted by key (stable); of equal keys the last wins, as
/// in a protobuf map.
fn write_sorted(out: &mut Vec<u8>, kv: &[(&[u8], &[u8])]) {
    out.extend_from_slice(b",\"fields\":{");
    let mut first = true;
    for (i, (k, v)) in kv.iter().enumerate() {
        if kv.get(i + 1).is_some_and(|next| next.0 == *k) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        escape_bytes(out, k);
        out.push(b':');
        escape_bytes(out, v);
    }
    out.push(b'}');
}

fn body(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(b",\"body\":\"");
    let mut s = String::new();
    base64::engine::general_purpose::STANDARD.encode_string(data, &mut s);
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Does byte `b` need escaping in a JSON string (as serde_json escapes)?
#[inline]
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Is any of the 8 bytes of `w` below 0x20, `"` or `\`? (SWAR; exact as a
/// test of the whole word, which is all it is used for.)
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let lt = |n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH;
    let eq = |c: u8| {
        let x = w ^ (ONES * u64::from(c));
        x.wrapping_sub(ONES) & !x & HIGH
    };
    (lt(0x20) | eq(b'"') | eq(b'\\')) != 0
}

/// Appends `s` as a JSON string, quotes included, escaped exactly as
/// serde_json does (`\"`, `\\`, `\b \f \n \r \t`, other control bytes as
/// `\u00xx`).
pub(crate) fn escape(out: &mut Vec<u8>, s: &str) {
    escape_bytes(out, s.as_bytes());
}

/// [`escape`] for bytes already checked to be UTF-8.
fn escape_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.reserve(b.len() + 2);
    out.push(b'"');
    // Fast path: find the first byte that needs escaping, 8 at a time.
    let mut i = 0;
    while i + 8 <= b.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        if word_needs_escape(u64::from_le_bytes(w)) {
            break;
        }
        i += 8;
    }
    while i < b.len() && !needs_escape(b[i]) {
        i += 1;
    }
    out.extend_from_slice(&b[..i]);
    let mut start = i;
    while i < b.len() {
        let c = b[i];
        if needs_escape(c) {
            out.extend_from_slice(&b[start..i]);
            match c {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(c >> 4)]);
                    out.push(HEX[usize::from(c & 0xf)]);
                }
            }
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}
