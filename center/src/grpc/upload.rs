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
//!
//! Bounds: stored files plus in-flight uploads stay under
//! `grpc.upload_quota_bytes` (`RESOURCE_EXHAUSTED "upload quota …"`); a
//! stream silent for `grpc.upload_idle_secs` between chunks fails
//! (`DEADLINE_EXCEEDED`); a token whose file already exists is refused
//! (`ALREADY_EXISTS`), before and after receiving (hard link, never a
//! replacing rename). Every refusal removes the partial file, adds a failed
//! 5100 result and counts in `elkeid_center_uploads_failed_total`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// Stored + in-flight bytes cap.
    pub(crate) quota_bytes: u64,
    /// Longest silence between chunks.
    pub(crate) idle: Duration,
}

/// The FileExt service.
#[derive(Debug)]
pub(crate) struct UploadSvc {
    cfg: UploadConfig,
    ctx: Ctx,
    slots: Arc<Semaphore>,
    seq: AtomicU64,
    /// Bytes received by uploads still in progress.
    inflight: AtomicU64,
}

/// Bytes of the stored uploads (hidden partial files excluded: they are
/// in-flight and counted there).
async fn stored_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0u64;
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return 0;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if let Ok(m) = e.metadata().await {
            total = total.saturating_add(m.len());
        }
    }
    total
}

/// Releases an upload's in-flight bytes when it ends, however it ends.
struct Inflight<'a> {
    counter: &'a AtomicU64,
    bytes: u64,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl UploadSvc {
    pub(crate) fn new(cfg: UploadConfig, ctx: Ctx) -> Self {
        UploadSvc {
            cfg,
            ctx,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            seq: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
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
        let first = match tokio::time::timeout(self.cfg.idle, inbound.message()).await {
            Ok(r) => match r? {
                Some(c) => c,
                None => return Err(Status::invalid_argument("empty upload")),
            },
            Err(_) => {
                inc(&self.ctx.metrics.uploads_failed);
                return Err(Status::deadline_exceeded(format!(
                    "no upload chunk within {} s",
                    self.cfg.idle.as_secs()
                )));
            }
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
        if tokio::fs::symlink_metadata(&final_path).await.is_ok() {
            let status = Status::already_exists(format!(
                "an upload with token {token} is already stored; not overwritten"
            ));
            tracing::warn!(%peer, token = %token, "upload refused: token already stored");
            self.result(&token, false, status.message().to_string());
            return Err(status);
        }
        let partial = self.cfg.dir.join(format!(
            ".{token}.partial-{}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let received = self.receive(first, &mut inbound, &partial).await;
        // Hard link, not rename: an existing file is never replaced.
        let stored = match received {
            Ok(size) => match tokio::fs::hard_link(&partial, &final_path).await {
                Ok(()) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    Ok(size)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Err(Failure::Refuse(Status::already_exists(format!(
                        "an upload with token {token} is already stored; not overwritten"
                    ))))
                }
                Err(e) => Err(Failure::Failed(format!("link into place: {e}"))),
            },
            Err(f) => Err(f),
        };
        match stored {
            Ok(size) => {
                tracing::info!(%peer, token = %token, size, "upload stored");
                self.result(&token, true, final_path.display().to_string());
                Ok(Response::new(FileUploadResponse {
                    status: StatusCode::Success as i32,
                }))
            }
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
        let stored = stored_bytes(&self.cfg.dir).await;
        let mut inflight = Inflight {
            counter: &self.inflight,
            bytes: 0,
        };
        let mut chunk = Some(first);
        loop {
            let Some(c) = chunk.take() else { break };
            let n = c.data.len() as u64;
            size = size.saturating_add(n);
            if size > self.cfg.max_bytes {
                return Err(Failure::Refuse(Status::resource_exhausted(format!(
                    "upload larger than {} bytes",
                    self.cfg.max_bytes
                ))));
            }
            let all = self
                .inflight
                .fetch_add(n, Ordering::Relaxed)
                .saturating_add(n);
            inflight.bytes += n;
            if stored.saturating_add(all) > self.cfg.quota_bytes {
                return Err(Failure::Refuse(Status::resource_exhausted(format!(
                    "upload quota of {} bytes (stored + in flight) reached",
                    self.cfg.quota_bytes
                ))));
            }
            w.write_all(&c.data)
                .await
                .map_err(|e| Failure::Failed(format!("write: {e}")))?;
            chunk = match tokio::time::timeout(self.cfg.idle, inbound.message()).await {
                Ok(r) => r.map_err(Failure::Refuse)?,
                Err(_) => {
                    return Err(Failure::Refuse(Status::deadline_exceeded(format!(
                        "no upload chunk within {} s",
                        self.cfg.idle.as_secs()
                    ))));
                }
            };
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
