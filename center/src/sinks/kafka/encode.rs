//! `MQData` values (spec §1.4) and the key → partition mapping.

use elkeid_proto::grpc::{EncodedRecord, MqData};
use prost::Message;

use crate::sinks::PacketBatch;

/// Builds the `MQData` of one record of `batch`: the record's type, agent
/// time and body (the serialized `Payload`, unchanged), the packet's host
/// metadata with every IP list joined by `","`, the packet's server time,
/// empty PSM name/path, and the batch's tag.
pub(crate) fn mq_data(batch: &PacketBatch, rec: &EncodedRecord) -> MqData {
    MqData {
        data_type: rec.data_type,
        agent_time: rec.timestamp,
        body: rec.data.clone(),
        agent_id: batch.agent_id.clone(),
        intranet_ipv4: batch.intranet_ipv4.join(","),
        extranet_ipv4: batch.extranet_ipv4.join(","),
        intranet_ipv6: batch.intranet_ipv6.join(","),
        extranet_ipv6: batch.extranet_ipv6.join(","),
        hostname: batch.hostname.clone(),
        version: batch.version.clone(),
        product: batch.product.clone(),
        svr_time: batch.svr_time,
        psm_name: String::new(),
        psm_path: String::new(),
        tag: batch.tag.clone(),
    }
}

/// The serialized `MQData` of every record of `batch`, in order.
///
/// The packet-level fields are encoded once and appended to each record's
/// own fields (protobuf allows any field order; we keep ascending order by
/// writing fields 1–3 first, then 4–15).
pub(crate) fn encode_batch(batch: &PacketBatch) -> Vec<Vec<u8>> {
    let template = mq_data(batch, &EncodedRecord::default());
    let mut shared = Vec::with_capacity(template.encoded_len());
    // data_type, agent_time and body are zero/empty in the template, so
    // this writes only fields 4..=15.
    if template.encode(&mut shared).is_err() {
        // Encoding into a Vec cannot run out of space; keep the per-record path.
        return batch
            .records
            .iter()
            .map(|r| mq_data(batch, r).encode_to_vec())
            .collect();
    }
    batch
        .records
        .iter()
        .map(|r| {
            let head = MqData {
                data_type: r.data_type,
                agent_time: r.timestamp,
                body: r.data.clone(),
                ..MqData::default()
            };
            let mut out = Vec::with_capacity(head.encoded_len() + shared.len());
            head.encode_raw(&mut out);
            out.extend_from_slice(&shared);
            out
        })
        .collect()
}

/// Sarama's default hash partitioner, so records of one agent land on the
/// same partition as with an Elkeid center: 32-bit FNV-1a of the key, as a
/// signed integer modulo the partition count, made non-negative.
pub(crate) fn partition_for(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    #[allow(clippy::cast_possible_wrap)] // Go: int32(hasher.Sum32())
    let p = (h as i32) % partitions;
    p.wrapping_abs()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn batch() -> PacketBatch {
        PacketBatch {
            svr_time: 1_700_000_100,
            agent_id: "id-1".into(),
            intranet_ipv4: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            extranet_ipv4: vec![],
            intranet_ipv6: vec!["fe80::1".into()],
            extranet_ipv6: vec![],
            hostname: "h".into(),
            version: "1.9".into(),
            product: "p".into(),
            tag: "t".into(),
            records: vec![
                EncodedRecord {
                    data_type: 1000,
                    timestamp: 1_700_000_000,
                    data: Bytes::from_static(b"\x0a\x06\x0a\x01k\x12\x01v"),
                },
                EncodedRecord {
                    data_type: 0,
                    timestamp: 0,
                    data: Bytes::new(),
                },
            ],
            id: None,
            ticket: None,
        }
    }

    /// Golden bytes written by hand from the field table of spec §1.4.
    #[test]
    fn mq_data_golden_bytes() {
        let b = batch();
        let got = encode_batch(&b);
        let mut want = vec![
            0x08, 0xe8, 0x07, // 1: data_type 1000
            0x10, 0x80, 0xe2, 0xcf, 0xaa, 0x06, // 2: agent_time 1700000000
            0x1a, 0x08, 0x0a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v', // 3: body
        ];
        let tail: Vec<u8> = [
            &[0x22, 0x04][..],
            b"id-1", // 4: agent_id
            &[0x2a, 0x11],
            b"10.0.0.1,10.0.0.2", // 5: intranet_ipv4 joined
            // 6 (extranet_ipv4) empty: omitted
            &[0x3a, 0x07],
            b"fe80::1", // 7: intranet_ipv6
            // 8 empty
            &[0x4a, 0x01],
            b"h", // 9: hostname
            &[0x52, 0x03],
            b"1.9", // 10: version
            &[0x5a, 0x01],
            b"p",                                  // 11: product
            &[0x60, 0xe4, 0xe2, 0xcf, 0xaa, 0x06], // 12: svr_time 1700000100
            // 13, 14 (psm) empty
            &[0x7a, 0x01],
            b"t", // 15: tag
        ]
        .concat();
        want.extend_from_slice(&tail);
        assert_eq!(got[0], want);
        // A record with zero type/time and empty body carries only the packet fields.
        assert_eq!(got[1], tail);
        // Same bytes as prost's own encoding of the whole struct.
        assert_eq!(got[0], mq_data(&b, &b.records[0]).encode_to_vec());
        let back = MqData::decode(&got[0][..]).unwrap();
        assert_eq!(back.extranet_ipv4, "");
        assert_eq!(back.psm_name, "");
        assert_eq!(back.tag, "t");
    }

    /// FNV-1a 32 reference values (offset basis, "a" = 0xe40c292c,
    /// "foobar" = 0xbf9cf968), then Go's `int32(h) % n`, negated if negative.
    #[test]
    fn partitioner_matches_sarama() {
        // 0x811c9dc5 as i32 = -2_128_831_035; % 7 = -2 -> 2.
        assert_eq!(partition_for(b"", 7), 2);
        // 0xe40c292c as i32 = -468_965_076; % 10 = -6 -> 6; % 7 = -6 -> 6.
        assert_eq!(partition_for(b"a", 10), 6);
        assert_eq!(partition_for(b"a", 7), 6);
        // 0xbf9cf968 as i32 = -1_080_231_576; % 6 = 0; % 5 = -1 -> 1.
        assert_eq!(partition_for(b"foobar", 6), 0);
        assert_eq!(partition_for(b"foobar", 5), 1);
        assert_eq!(partition_for(b"foobar", 1), 0);
        for n in 1..20 {
            let p = partition_for(b"agent-xyz", n);
            assert!((0..n).contains(&p));
        }
    }
}
