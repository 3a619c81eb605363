//! The `local` manager backend (default): component configs from a file,
//! task results appended to `DIR/task-results.ndjson`.
//!
//! # Component file (`manager.components_file`, default `DIR/components.json`)
//! JSON, or TOML when the name ends in `.toml`. Reloaded when its
//! modification time or size changes (checked every 3 s); a file that does not
//! parse is reported in the log and the previous contents stay in force.
//!
//! ```json
//! {
//!   "default": [
//!     {"name": "collector", "type": "plugin", "version": "1.0.0",
//!      "sha256": "<hex of the .tar.gz>", "signature": "<hex>",
//!      "download_url": ["http://10.0.0.1/collector-1.0.0.tar.gz"],
//!      "detail": ""},
//!     {"name": "elkeid-agent", "type": "agent", "version": "1.9.1",
//!      "sha256": "…", "signature": "…", "download_url": ["…"], "detail": ""}
//!   ],
//!   "agents": {
//!     "<agent id>": [ {"name": "collector", "version": "1.0.1", …} ]
//!   }
//! }
//! ```
//! A bare JSON array is taken as `default`. TOML: `[[default]]` tables and
//! `[[agents."<agent id>"]]` tables with the same keys. Every key of a
//! component is optional (empty string / empty list). For an agent listed
//! under `agents`, its entries replace the default entry of the same `name`
//! and add the others. When the resulting list is empty nothing is pushed
//! (an empty config list would make an agent delete all its plugins).
//!
//! # Task results
//! One JSON object per line in `DIR/task-results.ndjson`:
//! `{"agent_id": "…", "data_type": "5100", …record fields…}` (the record's
//! own `agent_id` field, if any, wins).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::{BoxFuture, Component, Manager, ManagerError, TaskItem};

/// Poll period of the component file.
const RELOAD_EVERY: Duration = Duration::from_secs(3);

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Components {
    #[serde(default)]
    pub(crate) default: Vec<Component>,
    #[serde(default)]
    pub(crate) agents: BTreeMap<String, Vec<Component>>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum JsonForm {
    List(Vec<Component>),
    Full(Components),
}

impl Components {
    /// Parses the file contents (TOML when `toml` is true).
    pub(crate) fn parse(text: &str, toml: bool) -> Result<Components, String> {
        if toml {
            return toml::from_str(text).map_err(|e| e.to_string());
        }
        match serde_json::from_str::<JsonForm>(text) {
            Ok(JsonForm::List(default)) => Ok(Components {
                default,
                agents: BTreeMap::new(),
            }),
            Ok(JsonForm::Full(c)) => Ok(c),
            // untagged errors are vague: re-parse as the full form for a precise message
            Err(_) => serde_json::from_str::<Components>(text).map_err(|e| e.to_string()),
        }
    }

    /// The list for one agent: defaults with its overrides applied by name.
    pub(crate) fn for_agent(&self, agent_id: &str) -> Vec<Component> {
        let mut list = self.default.clone();
        if let Some(over) = self.agents.get(agent_id) {
            for c in over {
                match list.iter_mut().find(|d| d.name == c.name) {
                    Some(d) => *d = c.clone(),
                    None => list.push(c.clone()),
                }
            }
        }
        list
    }
}

type Stamp = Option<(SystemTime, u64)>;

/// The local backend.
#[derive(Debug)]
pub(crate) struct LocalManager {
    components: Arc<Mutex<Components>>,
    results_path: PathBuf,
    results: Mutex<Option<std::fs::File>>,
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn load(path: &Path) -> Result<Components, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    Components::parse(
        &text,
        path.extension().and_then(|e| e.to_str()) == Some("toml"),
    )
}

impl LocalManager {
    /// Loads the component file (if present) and starts watching it.
    pub(crate) fn start(components_file: PathBuf, results_path: PathBuf) -> Arc<LocalManager> {
        let initial = if components_file.exists() {
            match load(&components_file) {
                Ok(c) => {
                    tracing::info!(path = %components_file.display(), components = c.default.len(), "component file loaded");
                    c
                }
                Err(error) => {
                    tracing::error!(path = %components_file.display(), %error, "component file does not parse; no configs will be pushed until it does");
                    Components::default()
                }
            }
        } else {
            tracing::info!(path = %components_file.display(), "no component file: config push is off until it appears");
            Components::default()
        };
        let components = Arc::new(Mutex::new(initial));
        let watch = Arc::downgrade(&components);
        let path = components_file;
        tokio::spawn(async move {
            let mut last = stamp(&path);
            let mut iv = tokio::time::interval(RELOAD_EVERY);
            loop {
                iv.tick().await;
                let Some(target) = watch.upgrade() else { break };
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                if now.is_none() {
                    tracing::warn!(path = %path.display(), "component file removed; keeping the last contents");
                    continue;
                }
                match load(&path) {
                    Ok(c) => {
                        tracing::info!(path = %path.display(), components = c.default.len(), "component file reloaded");
                        *target.lock().unwrap_or_else(|e| e.into_inner()) = c;
                    }
                    Err(error) => {
                        tracing::error!(path = %path.display(), %error, "component file does not parse; keeping the previous contents");
                    }
                }
            }
        });
        Arc::new(LocalManager {
            components,
            results_path,
            results: Mutex::new(None),
        })
    }

    fn append(&self, items: &[TaskItem]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for item in items {
            let mut obj = Map::new();
            obj.insert("agent_id".into(), Value::String(item.agent_id.clone()));
            for (k, v) in &item.fields {
                obj.insert(k.clone(), v.clone());
            }
            serde_json::to_writer(&mut buf, &obj).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let mut guard = self.results.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.results_path)?,
            );
        }
        match guard.as_mut() {
            Some(f) => f.write_all(&buf),
            None => Ok(()),
        }
    }
}

impl Manager for LocalManager {
    fn configs<'a>(
        &'a self,
        agent_id: &'a str,
        _detail: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Vec<Component>, ManagerError>> {
        let list = self
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .for_agent(agent_id);
        Box::pin(std::future::ready(Ok(list)))
    }

    fn push_task_results<'a>(
        &'a self,
        items: &'a [TaskItem],
    ) -> BoxFuture<'a, Result<(), ManagerError>> {
        Box::pin(async move { self.append(items).map_err(ManagerError::Io) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(name: &str, version: &str) -> Component {
        Component {
            name: name.into(),
            version: version.into(),
            ..Default::default()
        }
    }

    #[test]
    fn parse_forms_and_overrides() {
        let c = Components::parse(r#"[{"name":"a","version":"1"}]"#, false).unwrap();
        assert_eq!(c.default, vec![comp("a", "1")]);
        let c = Components::parse(
            r#"{"default":[{"name":"a","version":"1"},{"name":"b","version":"1"}],
                "agents":{"x":[{"name":"a","version":"2"},{"name":"c","version":"1"}]}}"#,
            false,
        )
        .unwrap();
        assert_eq!(c.for_agent("y"), vec![comp("a", "1"), comp("b", "1")]);
        assert_eq!(
            c.for_agent("x"),
            vec![comp("a", "2"), comp("b", "1"), comp("c", "1")]
        );
        let t = Components::parse(
            "[[default]]\nname = \"a\"\ntype = \"plugin\"\n[[agents.x]]\nname = \"b\"\n",
            true,
        )
        .unwrap();
        assert_eq!(t.default[0].kind, "plugin");
        assert_eq!(t.for_agent("x").len(), 2);
        assert!(
            Components::parse(r#"{"defaults":[]}"#, false)
                .unwrap_err()
                .contains("defaults")
        );
    }

    #[tokio::test]
    async fn results_are_appended() {
        let dir = tempfile::tempdir().unwrap();
        let m = LocalManager::start(
            dir.path().join("none.json"),
            dir.path().join("task-results.ndjson"),
        );
        let mut fields = Map::new();
        fields.insert("token".into(), "t1".into());
        fields.insert("data_type".into(), "5100".into());
        m.push_task_results(&[TaskItem {
            agent_id: "a".into(),
            fields,
        }])
        .await
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("task-results.ndjson")).unwrap();
        assert_eq!(
            text,
            "{\"agent_id\":\"a\",\"data_type\":\"5100\",\"token\":\"t1\"}\n"
        );
        assert!(m.configs("a", &Map::new()).await.unwrap().is_empty());
    }
}
