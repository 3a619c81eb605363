//! Property tests: our codecs against prost, an independent protobuf
//! implementation, on the Elkeid message shapes (spec §1.1, §1.3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};

use elkeid_core::frame::{self, FrameDecoder, TaskRef};
use elkeid_core::packet::{self, PacketMeta};
use elkeid_core::payload::{self, PayloadWriter};
use proptest::prelude::*;
use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct Record {
    #[prost(int32, tag = "1")]
    data_type: i32,
    #[prost(int64, tag = "2")]
    timestamp: i64,
    #[prost(message, optional, tag = "3")]
    data: Option<Payload>,
}

#[derive(Clone, PartialEq, Message)]
struct Payload {
    #[prost(map = "string, string", tag = "1")]
    fields: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
struct EncodedRecord {
    #[prost(int32, tag = "1")]
    data_type: i32,
    #[prost(int64, tag = "2")]
    timestamp: i64,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct PackagedData {
    #[prost(message, repeated, tag = "1")]
    records: Vec<EncodedRecord>,
    #[prost(string, tag = "2")]
    agent_id: String,
    #[prost(string, repeated, tag = "3")]
    intranet_ipv4: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    extranet_ipv4: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    intranet_ipv6: Vec<String>,
    #[prost(string, repeated, tag = "6")]
    extranet_ipv6: Vec<String>,
    #[prost(string, tag = "7")]
    hostname: String,
    #[prost(string, tag = "8")]
    version: String,
    #[prost(string, tag = "9")]
    product: String,
}

#[derive(Clone, PartialEq, Message)]
struct Task {
    #[prost(int32, tag = "1")]
    data_type: i32,
    #[prost(string, tag = "2")]
    object_name: String,
    #[prost(string, tag = "3")]
    data: String,
    #[prost(string, tag = "4")]
    token: String,
}

/// Payload map as our reader sees it (last key wins).
fn our_map(payload: &[u8]) -> BTreeMap<String, String> {
    payload::entries(payload)
        .map(|e| {
            let (k, v) = e.unwrap();
            (
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect()
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn map_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("[a-z_]{0,8}", "\\PC{0,20}", 0..6)
}

fn reencode(rec: &frame::RecordRef<'_>) -> Vec<u8> {
    let mut out = vec![0u8; rec.encoded_len()];
    rec.encode_to(&mut out);
    out
}

/// A Record body built from arbitrary pieces: the three fields (possibly
/// zero, repeated, out of order) and unknown fields of every wire type.
#[derive(Debug, Clone)]
enum Piece {
    DataType(i32),
    Timestamp(i64),
    Data(BTreeMap<String, String>),
    UnknownVarint(u32, u64),
    UnknownFixed32(u32, u32),
    UnknownFixed64(u32, u64),
    UnknownBytes(u32, Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    let unknown_field = 4u32..3000;
    prop_oneof![
        any::<i32>().prop_map(Piece::DataType),
        any::<i64>().prop_map(Piece::Timestamp),
        map_strategy().prop_map(Piece::Data),
        (unknown_field.clone(), any::<u64>()).prop_map(|(f, v)| Piece::UnknownVarint(f, v)),
        (unknown_field.clone(), any::<u32>()).prop_map(|(f, v)| Piece::UnknownFixed32(f, v)),
        (unknown_field.clone(), any::<u64>()).prop_map(|(f, v)| Piece::UnknownFixed64(f, v)),
        (unknown_field, prop::collection::vec(any::<u8>(), 0..10))
            .prop_map(|(f, v)| Piece::UnknownBytes(f, v)),
    ]
}

fn encode_pieces(pieces: &[Piece]) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::DataType(v) => {
                encode_key(1, WireType::Varint, &mut out);
                encode_varint(i64::from(*v) as u64, &mut out);
            }
            Piece::Timestamp(v) => {
                encode_key(2, WireType::Varint, &mut out);
                encode_varint(*v as u64, &mut out);
            }
            Piece::Data(m) => {
                let p = Payload {
                    fields: m.clone().into_iter().collect(),
                };
                encode_key(3, WireType::LengthDelimited, &mut out);
                encode_varint(p.encoded_len() as u64, &mut out);
                p.encode(&mut out).unwrap();
            }
            Piece::UnknownVarint(f, v) => {
                encode_key(*f, WireType::Varint, &mut out);
                encode_varint(*v, &mut out);
            }
            Piece::UnknownFixed32(f, v) => {
                encode_key(*f, WireType::ThirtyTwoBit, &mut out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Piece::UnknownFixed64(f, v) => {
                encode_key(*f, WireType::SixtyFourBit, &mut out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Piece::UnknownBytes(f, v) => {
                encode_key(*f, WireType::LengthDelimited, &mut out);
                encode_varint(v.len() as u64, &mut out);
                out.extend_from_slice(v);
            }
        }
    }
    out
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(512)))]

    /// prost-encoded Records decode to the same values; the body passes
    /// through exactly when prost's bytes are canonical, and our
    /// EncodedRecord bytes decode with prost to the same Record.
    #[test]
    fn record_from_prost(dt in any::<i32>(), ts in any::<i64>(), m in prop::option::of(map_strategy())) {
        let rec = Record { data_type: dt, timestamp: ts, data: m.clone().map(|m| Payload { fields: m.into_iter().collect() }) };
        let body = rec.encode_to_vec();
        let f = frame_of(&body);
        let (ours, used) = frame::decode_frame(&f, frame::DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
        prop_assert_eq!(used, f.len());
        prop_assert_eq!((ours.data_type, ours.timestamp), (dt, ts));
        prop_assert_eq!(our_map(ours.payload), m.clone().unwrap_or_default());
        // prost writes `1a 00` for Some(empty Payload): not canonical.
        let empty_data = matches!(&m, Some(m) if m.is_empty());
        prop_assert_eq!(ours.canonical, !empty_data);
        let enc = reencode(&ours);
        let back = EncodedRecord::decode(&enc[..]).unwrap();
        prop_assert_eq!((back.data_type, back.timestamp), (dt, ts));
        prop_assert_eq!(&back.data, &ours.payload.to_vec());
        let back = Record::decode(&enc[..]).unwrap();
        prop_assert_eq!(back.data.map(|p| sorted(&p.fields)).unwrap_or_default(), m.unwrap_or_default());
    }

    /// Arbitrary field order, repetition and unknown fields: whatever prost
    /// makes of the bytes, we make the same, and our re-encoding is read
    /// back by prost as the same Record.
    #[test]
    fn record_pieces_agree_with_prost(pieces in prop::collection::vec(piece(), 0..8)) {
        let body = encode_pieces(&pieces);
        let want = Record::decode(&body[..]).unwrap();
        let ours = frame::decode_record(&body).unwrap();
        prop_assert_eq!((ours.data_type, ours.timestamp), (want.data_type, want.timestamp));
        let merged: Vec<u8> = ours.payload_parts().flatten().copied().collect();
        prop_assert_eq!(merged.len(), ours.payload_len());
        let want_map = want.data.as_ref().map(|p| sorted(&p.fields)).unwrap_or_default();
        prop_assert_eq!(our_map(&merged), want_map.clone());
        let enc = reencode(&ours);
        if ours.canonical {
            prop_assert_eq!(&enc, &body);
        }
        let back = Record::decode(&enc[..]).unwrap();
        prop_assert_eq!((back.data_type, back.timestamp), (want.data_type, want.timestamp));
        prop_assert_eq!(back.data.map(|p| sorted(&p.fields)).unwrap_or_default(), want_map);
        // Re-encoding is canonical and stable.
        let again = frame::decode_record(&enc).unwrap();
        prop_assert!(again.canonical);
        prop_assert_eq!(reencode(&again), enc);
    }

    /// A stream of frames in random chunks decodes to the same records.
    #[test]
    fn stream_in_random_chunks(
        recs in prop::collection::vec((any::<i32>(), any::<i64>(), map_strategy()), 0..12),
        chunks in prop::collection::vec(1usize..40, 1..20),
    ) {
        let mut stream = Vec::new();
        for (dt, ts, m) in &recs {
            let r = Record { data_type: *dt, timestamp: *ts, data: (!m.is_empty()).then(|| Payload { fields: m.clone().into_iter().collect() }) };
            stream.extend(frame_of(&r.encode_to_vec()));
        }
        let mut d = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_LEN);
        let mut got = Vec::new();
        let mut pos = 0;
        let mut ci = 0;
        while pos < stream.len() {
            let n = chunks[ci % chunks.len()].min(stream.len() - pos);
            ci += 1;
            d.push(&stream[pos..pos + n]);
            pos += n;
            while let Some(r) = d.next_record().unwrap() {
                got.push((r.data_type, r.timestamp, our_map(r.payload)));
            }
        }
        prop_assert_eq!(got, recs);
        prop_assert_eq!(d.buffered(), 0);
    }

    /// PayloadWriter output is a Payload for prost; entries() agrees.
    #[test]
    fn payload_writer_vs_prost(kv in prop::collection::vec(("\\PC{0,6}", "\\PC{0,30}"), 0..8), f in any::<f64>(), i in any::<i64>()) {
        let mut buf = vec![0u8; 4096];
        let mut w = PayloadWriter::new(&mut buf);
        for (k, v) in &kv {
            w.field(k, v);
        }
        w.field_f64("f", f).field_i64("i", i);
        let n = w.finish().unwrap();
        let p = Payload::decode(&buf[..n]).unwrap();
        let mut want: BTreeMap<String, String> = kv.iter().cloned().collect();
        want.insert("f".into(), elkeid_core::payload::GoFloat(f).to_string());
        want.insert("i".into(), i.to_string());
        prop_assert_eq!(sorted(&p.fields), want.clone());
        prop_assert_eq!(our_map(&buf[..n]), want);
        let listed: Vec<_> = payload::entries(&buf[..n]).map(|e| e.unwrap()).collect();
        prop_assert_eq!(listed.len(), kv.len() + 2);
        // Finite floats: 8 decimals, parse back to within rounding.
        if f.is_finite() {
            let s = elkeid_core::payload::GoFloat(f).to_string();
            let (_, frac) = s.split_once('.').unwrap();
            prop_assert_eq!(frac.len(), 8);
            let back: f64 = s.parse().unwrap();
            // 0.5e-8 from the decimal rounding, plus the parse's rounding (<= 1 ulp).
            prop_assert!((back - f).abs() <= 0.5e-8 + f.abs() * f64::EPSILON);
        }
        // The Vec-backed builder writes the same bytes.
        let mut pb = elkeid_core::payload::PayloadBuf::new();
        for (k, v) in &kv {
            pb.field(k, v);
        }
        pb.field_f64("f", f).field_i64("i", i);
        prop_assert_eq!(pb.as_bytes(), &buf[..n]);
    }

    /// PackagedData from our packet encoder decodes with prost.
    #[test]
    fn packet_vs_prost(
        recs in prop::collection::vec((any::<i32>(), any::<i64>(), prop::collection::vec(any::<u8>(), 0..40)), 0..6),
        id in "\\PC{0,10}",
        lists in prop::collection::vec(prop::collection::vec("[0-9.:a-f]{0,15}", 0..3), 4),
        host in "\\PC{0,10}", ver in "[0-9.]{0,8}", prod in "[a-z-]{0,12}",
    ) {
        let encoded: Vec<Vec<u8>> = recs.iter().map(|(dt, ts, data)| EncodedRecord { data_type: *dt, timestamp: *ts, data: data.clone() }.encode_to_vec()).collect();
        let l: Vec<Vec<&str>> = lists.iter().map(|l| l.iter().map(String::as_str).collect()).collect();
        let meta = PacketMeta {
            agent_id: &id, intranet_ipv4: &l[0], extranet_ipv4: &l[1], intranet_ipv6: &l[2], extranet_ipv6: &l[3],
            hostname: &host, version: &ver, product: &prod,
        };
        let mut mbuf = vec![0u8; packet::meta_len(&meta)];
        let mlen = packet::encode_meta(&meta, &mut mbuf).unwrap();
        prop_assert_eq!(mlen, mbuf.len());
        let total = packet::packet_len(encoded.iter().map(Vec::as_slice), &mbuf);
        let mut out = vec![0u8; total];
        let n = packet::encode_packet(encoded.iter().map(Vec::as_slice), &mbuf, &mut out).unwrap();
        prop_assert_eq!(n, total);
        let p = PackagedData::decode(&out[..]).unwrap();
        let want = PackagedData {
            records: recs.iter().map(|(dt, ts, data)| EncodedRecord { data_type: *dt, timestamp: *ts, data: data.clone() }).collect(),
            agent_id: id.clone(), intranet_ipv4: lists[0].clone(), extranet_ipv4: lists[1].clone(),
            intranet_ipv6: lists[2].clone(), extranet_ipv6: lists[3].clone(),
            hostname: host.clone(), version: ver.clone(), product: prod.clone(),
        };
        prop_assert_eq!(&p, &want);
        // prost's own encoding is byte-identical (same field order, same omissions).
        prop_assert_eq!(want.encode_to_vec(), out);
    }

    /// Task frames: ours == prost's bytes, and both decode alike.
    #[test]
    fn task_vs_prost(dt in any::<i32>(), name in "\\PC{0,12}", data in "\\PC{0,60}", token in "\\PC{0,12}") {
        let t = TaskRef { data_type: dt, object_name: &name, data: &data, token: &token };
        let mut out = vec![0u8; frame::task_frame_len(&t)];
        let n = frame::encode_task_frame(&t, &mut out).unwrap();
        prop_assert_eq!(n, out.len());
        let want = Task { data_type: dt, object_name: name.clone(), data: data.clone(), token: token.clone() };
        prop_assert_eq!(&out[4..], &want.encode_to_vec()[..]);
        prop_assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()) as usize, n - 4);
        let (back, used) = frame::decode_task_frame(&out, 1 << 20).unwrap().unwrap();
        prop_assert_eq!(used, n);
        prop_assert_eq!(back, t);
    }

    /// The whole data path: plugin frames (any field order, unknown and
    /// repeated fields) -> FrameDecoder -> Ring -> PackagedData, read back
    /// by prost as the center would: every record arrives, in order, with
    /// the values prost itself reads from the plugin's bytes.
    #[test]
    fn plugin_frames_to_packet(bodies in prop::collection::vec(prop::collection::vec(piece(), 0..6), 1..10)) {
        use elkeid_core::ring::{Class, Ring, RingConfig};
        let bodies: Vec<Vec<u8>> = bodies.iter().map(|p| encode_pieces(p)).collect();
        let stream: Vec<u8> = bodies.iter().flat_map(|b| frame_of(b)).collect();
        let mut d = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_LEN);
        let mut ring: Ring<16> = Ring::new(RingConfig { byte_budget: 64 * 1024, agent_reserved_records: 1, agent_reserved_bytes: 1024 });
        for chunk in stream.chunks(7) {
            d.push(chunk);
            while let Some(rec) = d.next_record().unwrap() {
                ring.push_frame(Class::Plugin, &rec).unwrap();
            }
        }
        let meta = PacketMeta { agent_id: "a", hostname: "h", ..PacketMeta::default() };
        let mut mbuf = vec![0u8; packet::meta_len(&meta)];
        packet::encode_meta(&meta, &mut mbuf).unwrap();
        let b = ring.begin_batch(usize::MAX, usize::MAX).unwrap();
        let mut out = Vec::new();
        packet::encode_packet_vec(ring.batch_records(&b), &mbuf, &mut out);
        prop_assert_eq!(out.len(), packet::packet_len(ring.batch_records(&b), &mbuf));
        ring.commit(b);
        let p = PackagedData::decode(&out[..]).unwrap();
        prop_assert_eq!((&p.agent_id[..], &p.hostname[..]), ("a", "h"));
        prop_assert_eq!(p.records.len(), bodies.len());
        for (got, body) in p.records.iter().zip(&bodies) {
            let want = Record::decode(&body[..]).unwrap();
            prop_assert_eq!((got.data_type, got.timestamp), (want.data_type, want.timestamp));
            let got_map = sorted(&Payload::decode(&got.data[..]).unwrap().fields);
            prop_assert_eq!(got_map, want.data.map(|p| sorted(&p.fields)).unwrap_or_default());
        }
    }
}

/// The Go agent's `Command` (gogofaster, agent/proto): fields 2 and 3 only.
#[derive(Clone, PartialEq, Message)]
struct ElkeidAgentCommand {
    #[prost(message, optional, tag = "2")]
    task: Option<Task>,
    #[prost(string, repeated, tag = "3")]
    configs: Vec<String>,
}

/// A packet carrying the acknowledged-delivery fields decodes, with every
/// Elkeid field unchanged, in a decoder that does not know them (Elkeid's
/// center skips or keeps unknown fields the same way), and our reader
/// finds the identity again.
#[test]
fn ack_fields_are_skipped_by_elkeid_decoders() {
    use elkeid_core::ack::{self, PacketId};
    let rec = EncodedRecord {
        data_type: 1000,
        timestamp: 1_700_000_000,
        data: vec![0x0a, 0x00],
    }
    .encode_to_vec();
    let meta = PacketMeta {
        agent_id: "a1",
        hostname: "h",
        product: "elkeid-agent",
        ..PacketMeta::default()
    };
    let mut mbuf = vec![0u8; packet::meta_len(&meta)];
    packet::encode_meta(&meta, &mut mbuf).unwrap();
    let mut pkt = Vec::new();
    packet::encode_packet_vec(std::iter::once(&rec[..]), &mbuf, &mut pkt);
    let plain = pkt.clone();
    let id = PacketId {
        epoch: 0xdead_beef_1234,
        seq: 77,
    };
    let mut ext = [0u8; 32];
    let n = ack::encode_packet_id(id, &mut ext).unwrap();
    pkt.extend_from_slice(&ext[..n]);
    assert_eq!(
        PackagedData::decode(&pkt[..]).unwrap(),
        PackagedData::decode(&plain[..]).unwrap()
    );
    assert_eq!(ack::decode_packet_id(&pkt), Ok(Some(id)));
    assert_eq!(ack::decode_packet_id(&plain), Ok(None));

    // An ack-only Command is, to the Go agent, a Command with neither task
    // nor configs: an empty config list that removes every plugin. This is
    // why our center never sends one to a stream that did not advertise.
    let cmd = ElkeidAgentCommand::decode(&ext[..n]).unwrap();
    assert_eq!(cmd, ElkeidAgentCommand::default());
}

/// `n` cases, or `PROPTEST_CASES` when set (CI lowers it for the suites it
/// runs under QEMU, where every case is emulated; the native run keeps `n`).
fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n)
}
