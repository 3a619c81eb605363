//! Agent identity bound to the client certificate (`grpc.agent_identity`).
//!
//! - `shared` (default, Elkeid's model): every agent presents the same
//!   client certificate; the `agent_id` of the first packet is believed.
//! - `cert`: the client certificate's subject common name (CN) is the agent
//!   id. A stream whose first packet names another id is refused with
//!   `PERMISSION_DENIED`, and so is a later packet whose `agent_id` differs
//!   from the one the stream registered; both are counted in
//!   `elkeid_center_identity_mismatches_total`. Certificates are issued per
//!   agent with `elkeid-center pki issue-agent`.
//!
//! The CN is read from the leaf certificate that rustls has already
//! verified against the CA, with a small DER walker ([`subject_cn`]) that
//! never panics and allocates only the returned string.

use crate::der::{SEQUENCE, tlv};

/// How the center decides who an agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentIdentity {
    /// Trust the first packet's `agent_id` (Elkeid compatible).
    #[default]
    Shared,
    /// The agent id is the client certificate's CN.
    Cert,
}

impl std::str::FromStr for AgentIdentity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "shared" => Ok(AgentIdentity::Shared),
            "cert" => Ok(AgentIdentity::Cert),
            other => Err(format!("unknown mode `{other}` (expected shared or cert)")),
        }
    }
}

const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// 2.5.4.3 (commonName).
const OID_CN: [u8; 3] = [0x55, 0x04, 0x03];

/// The subject CN of a DER X.509 certificate (the last CN if several).
pub(crate) fn subject_cn(der: &[u8]) -> Option<String> {
    let (SEQUENCE, cert, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    // Optional explicit version [0].
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    // serial, signature algorithm, issuer, validity
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (SEQUENCE, mut rdns, _) = tlv(tbs)? else {
        return None;
    };
    let mut cn = None;
    while !rdns.is_empty() {
        let (tag, mut set, rest) = tlv(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, atv, rest) = tlv(set)?;
            set = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = tlv(atv)?;
            if tag == OID && oid == OID_CN {
                let (_, text, _) = tlv(value)?;
                cn = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_cn(cn: &str) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["elkeid.com".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "org");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_subject_cn() {
        for cn in ["agent-1", "9f0e6a4c-1111-4c2b-9d5e-0123456789ab", "é"] {
            assert_eq!(subject_cn(&cert_with_cn(cn)).as_deref(), Some(cn));
        }
    }

    #[test]
    fn never_panics_on_truncated_or_garbage_input() {
        let der = cert_with_cn("agent-1");
        for n in 0..der.len() {
            let _ = subject_cn(&der[..n]);
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = subject_cn(&flipped);
            flipped[i] ^= 0xff;
        }
        assert_eq!(subject_cn(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject_cn(b""), None);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("cert".parse(), Ok(AgentIdentity::Cert));
        assert_eq!("shared".parse(), Ok(AgentIdentity::Shared));
        assert!("x".parse::<AgentIdentity>().is_err());
    }
}
