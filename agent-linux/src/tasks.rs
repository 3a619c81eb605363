//! Tasks addressed to the agent itself (`object_name == "elkeid-agent"`):
//! 1050 upload a file through `FileExt.Upload`, 1051 set idc/region
//! (persisted in `<work-dir>/specified_env`, no helper binary), 1060
//! graceful shutdown. Every failure produces a 5100 record with the token.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use elkeid_proto::grpc::{FileUploadRequest, FileUploadResponse, Task};
use prost::Message;
use tokio::io::AsyncReadExt;

use crate::buffer::Buffer;
use crate::config::Config;
use crate::meta::HostMeta;
use crate::stop::{Exit, StopSignal};
use crate::transport::Link;

/// What agent tasks work with; owns the "an upload is running" flag.
#[derive(Debug)]
pub(crate) struct AgentTasks {
    pub(crate) cfg: Rc<Config>,
    pub(crate) meta: Rc<HostMeta>,
    pub(crate) buffer: Rc<Buffer>,
    /// Uploads open a stream on the live connection.
    pub(crate) link: Rc<Link>,
    pub(crate) stop: Rc<StopSignal>,
    /// An upload is running.
    pub(crate) upload_busy: Cell<bool>,
}

pub(crate) use crate::buffer::task_failed;

/// Set idc / region.
pub(crate) use elkeid_core::schema::data_type::TASK_SET_META as DT_SET_META;
/// Shut down.
pub(crate) use elkeid_core::schema::data_type::TASK_SHUTDOWN as DT_SHUTDOWN;
/// Upload a file.
pub(crate) use elkeid_core::schema::data_type::TASK_UPLOAD as DT_UPLOAD;

/// gRPC path of file uploads.
const UPLOAD_PATH: &str = "/grpc.FileExt/Upload";
/// Largest chunk per second.
const MAX_CHUNK: u64 = 512_000;
/// Whole-upload deadline.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(600);

/// Task errors (sent back as 5100 `msg`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskError {
    /// `data` is not the expected JSON.
    #[error("invalid task data: {0}")]
    Json(String),
    /// Another upload is running.
    #[error("last upload task hasn't completed")]
    Busy,
    /// Opening or reading the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than `buf_size * 600`.
    #[error("size limit exceeded: ({size}/{limit})")]
    TooLarge {
        /// File size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// No connection to the center.
    #[error("not connected to the center")]
    NotConnected,
    /// The upload RPC failed.
    #[error("upload failed: {0}")]
    Rpc(String),
    /// The center answered FAILED.
    #[error("center refused the upload")]
    Refused,
    /// The upload took longer than 600 s.
    #[error("upload timed out")]
    Timeout,
    /// The region is not configured.
    #[error("region {0:?} is not configured")]
    UnknownRegion(String),
    /// `specified_env` could not be written.
    #[error("cannot persist specified_env: {0}")]
    Persist(std::io::Error),
}

#[derive(Debug, serde::Deserialize)]
struct UploadReq {
    path: String,
    buf_size: i64,
}

/// Dispatches one agent task.
pub(crate) fn handle(agent: &Rc<AgentTasks>, task: Task) {
    match task.data_type {
        DT_UPLOAD => {
            if agent.upload_busy.get() {
                task_failed(&agent.buffer, &task.token, &TaskError::Busy.to_string());
                return;
            }
            let req: UploadReq = match serde_json::from_slice(task.data.as_bytes()) {
                Ok(r) => r,
                Err(e) => {
                    task_failed(
                        &agent.buffer,
                        &task.token,
                        &TaskError::Json(e.to_string()).to_string(),
                    );
                    return;
                }
            };
            agent.upload_busy.set(true);
            let a = agent.clone();
            tokio::task::spawn_local(async move {
                let r = match tokio::time::timeout(UPLOAD_DEADLINE, upload(&a, &task.token, &req))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(TaskError::Timeout),
                };
                a.upload_busy.set(false);
                match r {
                    Ok(n) => {
                        tracing::info!(token = %task.token, path = %req.path, bytes = n, "upload done")
                    }
                    Err(e) => task_failed(&a.buffer, &task.token, &e.to_string()),
                }
            });
        }
        DT_SET_META => {
            if let Err(e) = set_meta(agent, &task.data) {
                task_failed(&agent.buffer, &task.token, &e.to_string());
            }
        }
        DT_SHUTDOWN => {
            tracing::info!(token = %task.token, "shutdown requested by the center");
            agent.stop.stop(Exit::Terminate);
        }
        other => tracing::debug!(data_type = other, "ignoring agent task"),
    }
}

/// 1051: `{"idc": "...", "region": "..."}`, both optional strings.
fn set_meta(agent: &AgentTasks, data: &str) -> Result<(), TaskError> {
    let v: serde_json::Value =
        serde_json::from_slice(data.as_bytes()).map_err(|e| TaskError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| TaskError::Json("not an object".into()))?;
    let idc = obj
        .get("idc")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty());
    let region = obj
        .get("region")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty());
    if let Some(r) = region
        && !agent.cfg.servers.contains_key(r)
    {
        return Err(TaskError::UnknownRegion(r.to_string()));
    }
    let new_idc = idc
        .map(str::to_string)
        .unwrap_or_else(|| agent.meta.idc.borrow().clone());
    let new_region = region
        .map(str::to_string)
        .unwrap_or_else(|| agent.meta.region.borrow().clone());
    persist_env(&agent.cfg.specified_env_path(), &new_idc, &new_region)
        .map_err(TaskError::Persist)?;
    tracing::info!(idc = %new_idc, region = %new_region, "idc/region updated");
    agent.meta.idc.replace(new_idc);
    agent.meta.region.replace(new_region);
    Ok(())
}

/// Writes `specified_env` atomically, keeping unknown keys.
pub(crate) fn persist_env(path: &std::path::Path, idc: &str, region: &str) -> std::io::Result<()> {
    let mut props = std::fs::read_to_string(path)
        .map(|s| crate::config::parse_properties(&s))
        .unwrap_or_default();
    props.insert("specified_idc".into(), idc.to_string());
    props.insert("specified_region".into(), region.to_string());
    let mut text = String::new();
    for (k, v) in props {
        text.push_str(&k);
        text.push_str(" = ");
        text.push_str(&v);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// 1050: streams the file in chunks of min(buf_size, 512000) bytes, one per
/// second, on a new stream of the live connection.
async fn upload(agent: &AgentTasks, token: &str, req: &UploadReq) -> Result<u64, TaskError> {
    let io = |source| TaskError::Io {
        path: req.path.clone(),
        source,
    };
    if req.buf_size <= 0 {
        return Err(TaskError::Json(format!(
            "buf_size must be positive, got {}",
            req.buf_size
        )));
    }
    let buf_size = req.buf_size as u64;
    let mut file = tokio::fs::File::open(&req.path).await.map_err(io)?;
    let size = file.metadata().await.map_err(io)?.len();
    let limit = buf_size.saturating_mul(600);
    if size > limit {
        return Err(TaskError::TooLarge { size, limit });
    }
    let ch = agent
        .link
        .channel
        .borrow()
        .clone()
        .ok_or(TaskError::NotConnected)?;
    let chunk = buf_size.min(MAX_CHUNK) as usize;
    let rpc = |e: crate::transport::grpc::GrpcError| TaskError::Rpc(e.to_string());
    let (mut tx, response) =
        crate::transport::grpc::start(&ch.send, &ch.counters, &agent.cfg.server_name, UPLOAD_PATH)
            .await
            .map_err(rpc)?;
    let token_s = token.to_string();
    let path = req.path.clone();
    let reader = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sent = 0u64;
        loop {
            tick.tick().await;
            let mut data = vec![0u8; chunk];
            let mut n = 0;
            while n < chunk {
                let r = file
                    .read(&mut data[n..])
                    .await
                    .map_err(|source| TaskError::Io {
                        path: path.clone(),
                        source,
                    })?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            data.truncate(n);
            sent += n as u64;
            let msg = FileUploadRequest {
                token: token_s.clone(),
                data: data.into(),
            };
            tx.send(&msg.encode_to_vec()).await.map_err(rpc)?;
            if n < chunk {
                tx.finish().map_err(rpc)?;
                return Ok(sent);
            }
        }
    };
    let call = async {
        let mut rx = crate::transport::grpc::Receiver::open(response, &ch.counters)
            .await
            .map_err(rpc)?;
        let resp = rx
            .message::<FileUploadResponse>()
            .await
            .map_err(rpc)?
            .ok_or_else(|| TaskError::Rpc("no response message".into()))?;
        // a unary response: the status follows the one message
        if rx
            .message::<FileUploadResponse>()
            .await
            .map_err(rpc)?
            .is_some()
        {
            return Err(TaskError::Rpc("more than one response message".into()));
        }
        Ok(resp)
    };
    let (sent, resp) = tokio::try_join!(reader, call)?;
    if resp.status != 0 {
        return Err(TaskError::Refused);
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_env_keeps_other_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("specified_env");
        std::fs::write(&p, "service_type = systemd\nspecified_idc = old\n").unwrap();
        persist_env(&p, "hz", "eu").unwrap();
        let props = crate::config::parse_properties(&std::fs::read_to_string(&p).unwrap());
        assert_eq!(props["service_type"], "systemd");
        assert_eq!(props["specified_idc"], "hz");
        assert_eq!(props["specified_region"], "eu");
    }

    #[test]
    fn error_texts() {
        assert_eq!(
            TaskError::Busy.to_string(),
            "last upload task hasn't completed"
        );
        assert_eq!(
            TaskError::TooLarge { size: 10, limit: 6 }.to_string(),
            "size limit exceeded: (10/6)"
        );
    }
}
