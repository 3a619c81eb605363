//! Self-update (owned by agent-plugins; placeholder with the agreed interface).

use std::path::PathBuf;

/// What self-update needs.
#[derive(Debug, Clone)]
pub(crate) struct UpdateContext {
    /// `<work-dir>`.
    pub(crate) work_dir: PathBuf,
}

/// Result of a successful update.
#[derive(Debug)]
pub(crate) enum UpdateOutcome {
    /// The new binary is in place; shut down gracefully and re-exec.
    Replaced(PathBuf),
}

/// Self-update errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpdateError {
    /// Not built yet.
    #[error("self-update is not supported by this build")]
    Unsupported,
}

/// Called for a Config named "elkeid-agent" whose version differs from ours.
pub(crate) async fn self_update(
    _ctx: &UpdateContext,
    _cfg: &elkeid_proto::grpc::Config,
) -> Result<UpdateOutcome, UpdateError> {
    Err(UpdateError::Unsupported)
}
