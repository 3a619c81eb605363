//! `FileExt.Upload` (spec §5.5): stores a client-streamed file as
//! `DIR/uploads/<token>`.
//!
//! The token (from the first chunk) must match `[A-Za-z0-9_-]{1,128}`, else
//! the call is refused with `INVALID_ARGUMENT` (Elkeid used it unsanitised as
//! a path). Data goes to a hidden partial file that is renamed into place
//! when the client finishes; any error or a file larger than
//! `grpc.upload_max_bytes` removes the partial file. Each upload adds a 5100
//! task result `{"token","status":"succeed"|"failed","msg","data_type":"5100"}`
//! (`msg` = stored path or the error). At most [`MAX_CONCURRENT`] uploads run
//! at once; more are refused with `RESOURCE_EXHAUSTED`. Unlike Elkeid, the
//! file is not zipped or forwarded to a manager.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use elkeid_proto::grpc::file_ext_server::FileExt;
use elkeid_proto::grpc::{FileUploadRequest, FileUploadResponse, file_upload_response::StatusCode};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use crate::manager::TaskItem;
use crate::metrics::inc;
use crate::records::Ctx;

/// Concurrent uploads.
pub(crate) const MAX_CONCURRENT: usize = 64;
/// Longest token.
const MAX_TOKEN: usize = 128;

/// Upload settings.
#[derive(Debug, Clone)]
pub(crate) struct UploadConfig {
    pub(crate) dir: PathBuf,
    pub(crate) max_bytes: u64,
}

/// The FileExt service.
#[derive(Debug)]
pub(crate) struct UploadSvc {
    cfg: UploadConfig,
    ctx: Ctx,
    slots: Arc<Semaphore>,
    seq: AtomicU64,
}

impl UploadSvc {
    pub(crate) fn new(cfg: UploadConfig, ctx: Ctx) -> Self {
        UploadSvc {
            cfg,
            ctx,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            seq: AtomicU64::new(0),
        }
    }

    fn result(&self, token: &str, ok: bool, msg: String) {
        use elkeid_core::schema::{data_type, task_result as tr};
        let mut f = Map::new();
        f.insert(tr::TOKEN.into(), Value::String(token.to_string()));
        let status = if ok { tr::SUCCEED } else { tr::FAILED };
        f.insert(tr::STATUS.into(), Value::String(status.into()));
        f.insert(tr::MSG.into(), Value::String(msg));
        f.insert(
            "data_type".into(),
            Value::String(data_type::TASK_RESULT.to_string()),
        );
        self.ctx.tasks.push(TaskItem {
            agent_id: String::new(),
            fields: f,
        });
        inc(if ok {
            &self.ctx.metrics.uploads_ok
        } else {
            &self.ctx.metrics.uploads_failed
        });
    }
}

/// True for a token that is safe as a file name.
pub(crate) fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

enum Failure {
    Refuse(Status),
    Failed(String),
}

#[tonic::async_trait]
impl FileExt for UploadSvc {
    async fn upload(
        &self,
        req: Request<Streaming<FileUploadRequest>>,
    ) -> Result<Response<FileUploadResponse>, Status> {
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            inc(&self.ctx.metrics.uploads_failed);
            return Err(Status::resource_exhausted("too many concurrent uploads"));
        };
        let peer = super::peer(req.remote_addr());
        let mut inbound = req.into_inner();
        let first = match inbound.message().await? {
            Some(c) => c,
            None => return Err(Status::invalid_argument("empty upload")),
        };
        let token = first.token.clone();
        if !valid_token(&token) {
            inc(&self.ctx.metrics.uploads_failed);
            tracing::warn!(%peer, token = %token.escape_debug(), "upload refused: bad token");
            return Err(Status::invalid_argument(
                "upload token must match [A-Za-z0-9_-]{1,128}",
            ));
        }
        let final_path = self.cfg.dir.join(&token);
        let partial = self.cfg.dir.join(format!(
            ".{token}.partial-{}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        match self.receive(first, &mut inbound, &partial).await {
            Ok(size) => match tokio::fs::rename(&partial, &final_path).await {
                Ok(()) => {
                    tracing::info!(%peer, token = %token, size, "upload stored");
                    self.result(&token, true, final_path.display().to_string());
                    Ok(Response::new(FileUploadResponse {
                        status: StatusCode::Success as i32,
                    }))
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    tracing::error!(%peer, token = %token, error = %e, "upload rename failed");
                    self.result(&token, false, e.to_string());
                    Ok(Response::new(FileUploadResponse {
                        status: StatusCode::Failed as i32,
                    }))
                }
            },
            Err(f) => {
                let _ = tokio::fs::remove_file(&partial).await;
                match f {
                    Failure::Refuse(status) => {
                        tracing::warn!(%peer, token = %token, %status, "upload refused");
                        self.result(&token, false, status.message().to_string());
                        Err(status)
                    }
                    Failure::Failed(msg) => {
                        tracing::error!(%peer, token = %token, error = %msg, "upload failed");
                        self.result(&token, false, msg);
                        Ok(Response::new(FileUploadResponse {
                            status: StatusCode::Failed as i32,
                        }))
                    }
                }
            }
        }
    }
}

impl UploadSvc {
    async fn receive(
        &self,
        first: FileUploadRequest,
        inbound: &mut Streaming<FileUploadRequest>,
        partial: &std::path::Path,
    ) -> Result<u64, Failure> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(partial)
            .await
            .map_err(|e| Failure::Failed(format!("create {}: {e}", partial.display())))?;
        let mut w = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let mut size: u64 = 0;
        let mut chunk = Some(first);
        loop {
            let Some(c) = chunk.take() else { break };
            size = size.saturating_add(c.data.len() as u64);
            if size > self.cfg.max_bytes {
                return Err(Failure::Refuse(Status::resource_exhausted(format!(
                    "upload larger than {} bytes",
                    self.cfg.max_bytes
                ))));
            }
            w.write_all(&c.data)
                .await
                .map_err(|e| Failure::Failed(format!("write: {e}")))?;
            chunk = inbound.message().await.map_err(Failure::Refuse)?;
        }
        w.flush()
            .await
            .map_err(|e| Failure::Failed(format!("write: {e}")))?;
        w.get_ref()
            .sync_all()
            .await
            .map_err(|e| Failure::Failed(format!("sync: {e}")))?;
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::valid_token;

    #[test]
    fn token_sanitising() {
        assert!(valid_token("abc-DEF_123"));
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            "a.b",
            "a b",
            "é",
            "..",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(!valid_token(bad), "{bad:?}");
        }
    }
}
