//! Development PKI and API keys generated on first start.
//!
//! `DIR/pki/`: `ca.crt`/`ca.key` (the dev CA), `server.crt`/`server.key`
//! (SAN `DNS:elkeid.com`, `DNS:localhost`, `IP:127.0.0.1`) and
//! `client.crt`/`client.key` (the certificate every agent presents), all PEM,
//! ECDSA P-256. `DIR/api-keys.toml`: `[aksk]` table, one random access key.
//! Existing files are reused and never overwritten; a missing leaf is signed
//! by the existing CA when `ca.key` is there.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::config::AkSk;

/// Why the PKI or the API keys could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A leaf must be generated but the CA key is missing.
    #[error("{0} is missing and cannot be generated without ca.key next to ca.crt")]
    NoCaKey(PathBuf),
    /// The API key file is not a valid `[aksk]` table.
    #[error("{path}: bad api key file: {msg}")]
    BadKeys {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// Longest agent id accepted by `pki issue-agent` (as the stream check).
const MAX_AGENT_ID: usize = 128;

/// True for an agent id usable as a certificate CN and a file name.
pub(crate) fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENT_ID
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Issues a client certificate for one agent (`agent_identity = cert`):
/// subject CN = `agent_id`, signed by the dev CA in `pki_dir` (`ca.key`
/// required), written as `<out_dir>/<agent_id>.crt` and `.key` (0600). An
/// existing pair is never overwritten (error). Returns (cert, key) paths.
pub(crate) fn issue_agent(
    pki_dir: &Path,
    agent_id: &str,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let what = "agent certificate";
    let ca_key_path = pki_dir.join("ca.key");
    let key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Generate {
        what: "CA key",
        source,
    })?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut params = leaf_params(false)?;
    params.distinguished_name = subject(agent_id);
    let key = KeyPair::generate().map_err(|source| PkiError::Generate { what, source })?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate { what, source })?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let cert_path = out_dir.join(format!("{agent_id}.crt"));
    let key_path = out_dir.join(format!("{agent_id}.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Io {
                path: p.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists; not overwritten (remove it to re-issue)",
                ),
            });
        }
    }
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    Ok((cert_path, key_path))
}

/// `elkeid-center pki issue-agent --data-dir DIR --agent-id ID [--out DIR]`:
/// exit code 0 on success, 64 on bad arguments, 1 on failure. `args` are
/// the arguments after `pki`.
pub fn pki_command(args: &[String]) -> u8 {
    const USAGE: &str = "usage: elkeid-center pki issue-agent --agent-id ID [--data-dir DIR] [--out DIR]\n\
        Issues DIR/pki/agents/ID.crt + ID.key (CN = ID), signed by DIR/pki/ca.key,\n\
        for grpc.agent_identity = cert. DIR defaults to ./elkeid-data.";
    let mut it = args.iter();
    if it.next().map(String::as_str) != Some("issue-agent") {
        eprintln!("{USAGE}");
        return 64;
    }
    let (mut data_dir, mut agent_id, mut out) = (PathBuf::from("./elkeid-data"), None, None);
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned();
        match a.as_str() {
            "--data-dir" => match value() {
                Some(v) => data_dir = PathBuf::from(v),
                None => {
                    eprintln!("{USAGE}");
                    return 64;
                }
            },
            "--agent-id" => agent_id = value(),
            "--out" => out = value().map(PathBuf::from),
            "-h" | "--help" => {
                println!("{USAGE}");
                return 0;
            }
            other => {
                eprintln!("elkeid-center pki: unknown argument `{other}`\n{USAGE}");
                return 64;
            }
        }
    }
    let Some(agent_id) = agent_id else {
        eprintln!("elkeid-center pki: --agent-id is required\n{USAGE}");
        return 64;
    };
    if !valid_agent_id(&agent_id) {
        eprintln!(
            "elkeid-center pki: agent id must match [A-Za-z0-9._-]{{1,{MAX_AGENT_ID}}}: {agent_id:?}"
        );
        return 64;
    }
    let pki_dir = data_dir.join("pki");
    let out = out.unwrap_or_else(|| pki_dir.join("agents"));
    match issue_agent(&pki_dir, &agent_id, &out) {
        Ok((cert, key)) => {
            println!(
                "elkeid-center: issued agent certificate {} and key {} (CN {agent_id}); the agent also needs {}",
                cert.display(),
                key.display(),
                pki_dir.join("ca.crt").display()
            );
            0
        }
        Err(e) => {
            eprintln!("elkeid-center pki: {e}");
            1
        }
    }
}

/// Paths of the dev PKI.
#[derive(Debug, Clone)]
pub(crate) struct DevPki {
    pub(crate) ca_cert: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
    /// Names of the files created by this call.
    pub(crate) created: Vec<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` only if it does not exist (temp file + hard link,
/// so a concurrent or earlier file is never replaced). Returns true if written.
fn write_new(path: &Path, data: &[u8], secret: bool) -> Result<bool, PkiError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(if secret { 0o600 } else { 0o644 });
        }
        #[cfg(not(unix))]
        let _ = secret;
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(PkiError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn subject(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "elkeid-rs dev");
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf_params(server: bool) -> Result<CertificateParams, PkiError> {
    let what = if server {
        "server certificate"
    } else {
        "client certificate"
    };
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|source| PkiError::Generate { what, source })?;
    p.distinguished_name = subject(if server { "elkeid.com" } else { "elkeid-agent" });
    p.subject_alt_names = if server {
        vec![
            SanType::DnsName(
                "elkeid.com"
                    .try_into()
                    .map_err(|source| PkiError::Generate { what, source })?,
            ),
            SanType::DnsName(
                "localhost"
                    .try_into()
                    .map_err(|source| PkiError::Generate { what, source })?,
            ),
            SanType::IpAddress(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        ]
    } else {
        vec![SanType::DnsName(
            "elkeid.com"
                .try_into()
                .map_err(|source| PkiError::Generate { what, source })?,
        )]
    };
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // The server certificate is also the center's client certificate
    // towards the other centers of a cluster (mutual TLS on forwarded calls).
    p.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let what = "CA certificate";
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|source| PkiError::Generate { what, source })?;
    p.distinguished_name = subject("elkeid-rs dev CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

/// Creates whatever is missing of the dev PKI under `dir` (`DIR/pki`).
pub(crate) fn ensure_dev_pki(dir: &Path) -> Result<DevPki, PkiError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let pki = DevPki {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        created: Vec::new(),
    };
    let ca_key_path = dir.join("ca.key");
    let mut created = Vec::new();
    let need_server = !pki.server_cert.exists() || !pki.server_key.exists();
    let need_client = !pki.client_cert.exists() || !pki.client_key.exists();
    if !need_server && !need_client && pki.ca_cert.exists() {
        return Ok(pki);
    }
    // Load or create the CA. A loaded CA is assumed to be one we generated
    // (same subject), which is all the issuer needs besides its key.
    let ca_key = if pki.ca_cert.exists() {
        if !ca_key_path.exists() {
            let missing = if need_server {
                &pki.server_cert
            } else {
                &pki.client_cert
            };
            return Err(PkiError::NoCaKey(missing.clone()));
        }
        let key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
        KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Generate {
            what: "CA key",
            source,
        })?
    } else {
        let what = "CA certificate";
        let key = KeyPair::generate().map_err(|source| PkiError::Generate { what, source })?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(|source| PkiError::Generate { what, source })?;
        if write_new(&ca_key_path, key.serialize_pem().as_bytes(), true)? {
            created.push(ca_key_path.clone());
        }
        if write_new(&pki.ca_cert, cert.pem().as_bytes(), false)? {
            created.push(pki.ca_cert.clone());
        }
        key
    };
    let ca_params = ca_params()?;
    let issuer = Issuer::new(ca_params, ca_key);
    for (server, need, cert_path, key_path) in [
        (true, need_server, &pki.server_cert, &pki.server_key),
        (false, need_client, &pki.client_cert, &pki.client_key),
    ] {
        if !need {
            continue;
        }
        let what = if server {
            "server certificate"
        } else {
            "client certificate"
        };
        let key = KeyPair::generate().map_err(|source| PkiError::Generate { what, source })?;
        let cert = leaf_params(server)?
            .signed_by(&key, &issuer)
            .map_err(|source| PkiError::Generate { what, source })?;
        if write_new(key_path, key.serialize_pem().as_bytes(), true)? {
            created.push(key_path.clone());
        }
        if write_new(cert_path, cert.pem().as_bytes(), false)? {
            created.push(cert_path.clone());
        }
    }
    Ok(DevPki { created, ..pki })
}

#[derive(serde::Deserialize)]
struct KeyFile {
    #[serde(default)]
    aksk: AkSk,
}

fn random_hex(bytes: usize) -> Result<String, PkiError> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Io {
            path: PathBuf::from("<random>"),
            source: std::io::Error::other("system random source failed"),
        })?;
    Ok(hex::encode(b))
}

/// Loads the `[aksk]` table, creating the file with one random pair if it
/// does not exist. Returns the map (keys lowercased) and whether it was created.
pub(crate) fn ensure_api_keys(path: &Path) -> Result<(AkSk, bool), PkiError> {
    let mut created = false;
    if !path.exists() {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let ak = random_hex(8)?;
        let sk = random_hex(16)?;
        let text = format!(
            "# HTTP API access keys (AccessKey -> SecretKey), Elkeid's server.http.auth.aksk.\n[aksk]\n{ak} = \"{sk}\"\n"
        );
        created = write_new(path, text.as_bytes(), true)?;
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let file: KeyFile = toml::from_str(&text).map_err(|e| PkiError::BadKeys {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let aksk = file
        .aksk
        .into_iter()
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect();
    Ok((aksk, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let p = ensure_dev_pki(&dir.path().join("pki")).unwrap();
        assert_eq!(p.created.len(), 6);
        let before = std::fs::read(&p.server_cert).unwrap();
        let again = ensure_dev_pki(&dir.path().join("pki")).unwrap();
        assert!(again.created.is_empty());
        assert_eq!(std::fs::read(&p.server_cert).unwrap(), before);
        // A removed client pair is re-issued by the same CA; the server cert stays.
        std::fs::remove_file(&p.client_cert).unwrap();
        let third = ensure_dev_pki(&dir.path().join("pki")).unwrap();
        assert_eq!(third.created.len(), 1);
        assert_eq!(std::fs::read(&p.server_cert).unwrap(), before);
    }

    #[test]
    fn agent_certificates_carry_the_id_and_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        ensure_dev_pki(&pki).unwrap();
        let out = pki.join("agents");
        let (cert, key) = issue_agent(&pki, "host-1", &out).unwrap();
        let pem = std::fs::read(&cert).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert_eq!(crate::identity::subject_cn(&der).as_deref(), Some("host-1"));
        assert!(key.exists());
        assert!(issue_agent(&pki, "host-1", &out).is_err(), "no overwrite");
        assert!(valid_agent_id("9f0e6a4c-1111-4c2b-9d5e-0123456789ab"));
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_agent_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn api_keys_created_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.toml");
        let (a, created) = ensure_api_keys(&path).unwrap();
        assert!(created);
        assert_eq!(a.len(), 1);
        let (b, created) = ensure_api_keys(&path).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        std::fs::write(&path, "[aksk]\nMyKey = \"s\"\n").unwrap();
        let (c, _) = ensure_api_keys(&path).unwrap();
        assert_eq!(c.get("mykey").map(String::as_str), Some("s"));
    }
}
