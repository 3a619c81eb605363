//! Settings of the NDJSON sink: its flags, its `[sinks.ndjson]` file table
//! and the resolved [`NdjsonConfig`].
//!
//! | flag | env | file key | default |
//! |---|---|---|---|
//! | `--ndjson-dir D` | `ELKEID_CENTER_NDJSON_DIR` | `sinks.ndjson.dir` | `DIR/records` |
//! | `--ndjson-rotate-bytes N` | `ELKEID_CENTER_NDJSON_ROTATE_BYTES` | `sinks.ndjson.rotate_bytes` | `268435456` |
//! | `--ndjson-retain-bytes N` | `ELKEID_CENTER_NDJSON_RETAIN_BYTES` | `sinks.ndjson.retain_bytes` | unset (keep all): oldest files removed beyond N bytes |
//! | `--ndjson-retain-secs N` | `ELKEID_CENTER_NDJSON_RETAIN_SECS` | `sinks.ndjson.retain_secs` | unset (keep all): files older than N s removed |

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, parse, pick_num, positive};

/// Default rotation size: 256 MiB.
const ROTATE_BYTES: u64 = 256 * 1024 * 1024;

/// The NDJSON sink's flags (flattened into [`crate::Cli`]).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct NdjsonArgs {
    /// Directory of the NDJSON sink. [default: DATA_DIR/records]
    #[arg(long, env = "ELKEID_CENTER_NDJSON_DIR")]
    pub ndjson_dir: Option<PathBuf>,
    /// NDJSON file size at which a new file is started, bytes. [default: 268435456]
    #[arg(long, env = "ELKEID_CENTER_NDJSON_ROTATE_BYTES", value_parser = parse::number::<u64>)]
    pub ndjson_rotate_bytes: Option<u64>,
    /// NDJSON retention: total bytes of record files kept (oldest removed first). [default: unset, keep all]
    #[arg(long, env = "ELKEID_CENTER_NDJSON_RETAIN_BYTES", value_parser = parse::number::<u64>)]
    pub ndjson_retain_bytes: Option<u64>,
    /// NDJSON retention: record files older than this many seconds are removed. [default: unset, keep all]
    #[arg(long, env = "ELKEID_CENTER_NDJSON_RETAIN_SECS", value_parser = parse::number::<u64>)]
    pub ndjson_retain_secs: Option<u64>,
}

/// File key -> argument id (for errors naming the flag or variable).
pub(crate) const KEY_ARGS: &[(&str, &str)] = &[
    ("sinks.ndjson.rotate_bytes", "ndjson_rotate_bytes"),
    ("sinks.ndjson.retain_bytes", "ndjson_retain_bytes"),
    ("sinks.ndjson.retain_secs", "ndjson_retain_secs"),
];

/// The `[sinks.ndjson]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NdjsonFile {
    dir: Option<PathBuf>,
    rotate_bytes: Option<u64>,
    retain_bytes: Option<u64>,
    retain_secs: Option<u64>,
}

/// NDJSON sink settings.
#[derive(Debug, Clone)]
pub struct NdjsonConfig {
    /// Output directory.
    pub dir: PathBuf,
    /// Rotation size.
    pub rotate_bytes: u64,
    /// Retention (unset: keep all).
    pub(crate) retention: super::Retention,
}

impl NdjsonConfig {
    /// Flag > env > file > default.
    pub(crate) fn resolve(
        args: NdjsonArgs,
        file: NdjsonFile,
        data_dir: &Path,
    ) -> Result<NdjsonConfig, ConfigError> {
        let key = "sinks.ndjson.rotate_bytes";
        let rotate: u64 = pick_num(
            key,
            args.ndjson_rotate_bytes,
            file.rotate_bytes,
            ROTATE_BYTES,
        )?;
        Ok(NdjsonConfig {
            dir: args
                .ndjson_dir
                .or(file.dir)
                .unwrap_or_else(|| data_dir.join("records")),
            rotate_bytes: positive(key, rotate)?,
            retention: super::Retention {
                max_bytes: args
                    .ndjson_retain_bytes
                    .or(file.retain_bytes)
                    .map(|v| positive("sinks.ndjson.retain_bytes", v))
                    .transpose()?,
                max_age: args
                    .ndjson_retain_secs
                    .or(file.retain_secs)
                    .map(|v| positive("sinks.ndjson.retain_secs", v).map(Duration::from_secs))
                    .transpose()?,
            },
        })
    }
}
