//! Command handling as a pure function (§3.5): a received `Command` becomes
//! a list of [`Action`]s; the caller executes them. No I/O here, so every
//! rule is unit-tested below.
//!
//! Rules (unchanged from the dispatch they replace; `agent_ctrl` is not
//! used, as before):
//! - A task addressed to `elkeid-agent` is an agent task (1050/1051/1060);
//!   any other `object_name` is a task for that plugin.
//! - A command with a task and an **empty** config list is only the task
//!   (Elkeid would also treat the empty list as "remove every plugin"; that
//!   bug is fixed). Without a task, the config list is a config sync even
//!   when empty; [`plan_sync`] decides what an empty desired set means.
//! - A config sync first clears the agent's own `state_detail` entries, then
//!   the `elkeid-agent` entry with a version other than ours asks for a
//!   self-update, then the rest is the desired plugin set.

use std::collections::BTreeMap;

use elkeid_proto::grpc::{Command, Config as PluginConfig, Task};

use crate::config::{PRODUCT, VERSION};

/// One thing to do for a received command, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Run an agent task (1050 upload, 1051 idc/region, 1060 shutdown).
    RunAgentTask(Task),
    /// Deliver a task to plugin `task.object_name` (fd 3).
    DeliverTask(Task),
    /// A config sync starts: clear the agent's own abnormal entries.
    ClearAbnormal,
    /// Download and install this `elkeid-agent` artifact, then re-exec.
    SelfUpdate(PluginConfig),
    /// The desired plugin set (the plugin manager turns it into
    /// [`PluginOp`]s with [`plan_sync`] under its sync lock).
    SyncPlugins(Vec<PluginConfig>),
}

/// Turns one received command into actions.
pub(crate) fn plan(cmd: Command) -> Vec<Action> {
    let mut out = Vec::new();
    if let Some(task) = cmd.task {
        if task.object_name == PRODUCT {
            out.push(Action::RunAgentTask(task));
        } else {
            out.push(Action::DeliverTask(task));
        }
        if cmd.configs.is_empty() {
            return out;
        }
    }
    out.push(Action::ClearAbnormal);
    let (own, plugins): (Vec<PluginConfig>, Vec<PluginConfig>) =
        cmd.configs.into_iter().partition(|c| c.name == PRODUCT);
    if let Some(cfg) = own.into_iter().next()
        && cfg.version != VERSION
    {
        out.push(Action::SelfUpdate(cfg));
    }
    out.push(Action::SyncPlugins(plugins));
    out
}

/// One step of a plugin config sync, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PluginOp {
    /// The entry is unusable (bad name): report it, do nothing else.
    Reject {
        /// The name as sent.
        name: String,
        /// The version as sent.
        version: String,
        /// Why.
        msg: String,
    },
    /// Stop the plugin and delete its directory.
    Remove(String),
    /// Install and start a plugin that is not running.
    Install(PluginConfig),
    /// Stage a new version, then replace the running one.
    Upgrade(PluginConfig),
}

/// The plan of a config sync: `ops` in order, and whether an empty desired
/// set kept the running plugins (logged as a warning).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct SyncPlan {
    /// What to do, in order: rejects, removals, then installs/upgrades by name.
    pub(crate) ops: Vec<PluginOp>,
    /// The desired set was empty and `empty_config_removes_all` is off.
    pub(crate) kept_all: bool,
}

/// Diffs the desired set `configs` against the running plugins
/// (`running`: name -> version). Entries named `elkeid-agent` are skipped
/// (self-update), names failing `validate` are rejected. An empty desired
/// set keeps everything unless `empty_config_removes_all` (Elkeid's
/// behaviour) is set. A listed plugin with the running version is left
/// alone.
pub(crate) fn plan_sync(
    configs: Vec<PluginConfig>,
    running: &BTreeMap<String, String>,
    empty_config_removes_all: bool,
    validate: impl Fn(&str) -> Result<(), String>,
) -> SyncPlan {
    let mut plan = SyncPlan::default();
    let mut desired: BTreeMap<String, PluginConfig> = BTreeMap::new();
    for c in configs {
        if c.name == PRODUCT {
            continue;
        }
        if let Err(e) = validate(&c.name) {
            plan.ops.push(PluginOp::Reject {
                msg: format!("load plugin {:?} failed: {e}", c.name),
                name: c.name,
                version: c.version,
            });
            continue;
        }
        desired.insert(c.name.clone(), c);
    }
    if desired.is_empty() && !empty_config_removes_all {
        plan.kept_all = !running.is_empty();
        return plan;
    }
    for name in running.keys() {
        if !desired.contains_key(name) {
            plan.ops.push(PluginOp::Remove(name.clone()));
        }
    }
    for (name, cfg) in desired {
        match running.get(&name) {
            Some(v) if *v == cfg.version => {}
            Some(_) => plan.ops.push(PluginOp::Upgrade(cfg)),
            None => plan.ops.push(PluginOp::Install(cfg)),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(object: &str, dt: i32) -> Task {
        Task {
            data_type: dt,
            object_name: object.into(),
            data: "{}".into(),
            token: "tok".into(),
        }
    }

    fn cfg(name: &str, version: &str) -> PluginConfig {
        PluginConfig {
            name: name.into(),
            version: version.into(),
            ..Default::default()
        }
    }

    fn names_ok(n: &str) -> Result<(), String> {
        if n.contains('/') || n.is_empty() {
            Err("invalid name".into())
        } else {
            Ok(())
        }
    }

    #[test]
    fn agent_task_alone() {
        let a = plan(Command {
            task: Some(task(PRODUCT, 1060)),
            configs: vec![],
            ..Default::default()
        });
        assert_eq!(a, vec![Action::RunAgentTask(task(PRODUCT, 1060))]);
    }

    #[test]
    fn plugin_task_with_empty_configs_is_not_a_sync() {
        let a = plan(Command {
            task: Some(task("collector", 5000)),
            configs: vec![],
            ..Default::default()
        });
        assert_eq!(a, vec![Action::DeliverTask(task("collector", 5000))]);
    }

    #[test]
    fn task_with_configs_is_task_then_sync() {
        let a = plan(Command {
            task: Some(task("collector", 5000)),
            configs: vec![cfg("collector", "1.0")],
            ..Default::default()
        });
        assert_eq!(
            a,
            vec![
                Action::DeliverTask(task("collector", 5000)),
                Action::ClearAbnormal,
                Action::SyncPlugins(vec![cfg("collector", "1.0")]),
            ]
        );
    }

    #[test]
    fn empty_command_is_an_empty_sync() {
        let a = plan(Command::default());
        assert_eq!(a, vec![Action::ClearAbnormal, Action::SyncPlugins(vec![])]);
    }

    #[test]
    fn own_entry_other_version_is_self_update_and_never_a_plugin() {
        let a = plan(Command {
            task: None,
            configs: vec![cfg("driver", "1"), cfg(PRODUCT, "9.9.9-new")],
            ..Default::default()
        });
        assert_eq!(
            a,
            vec![
                Action::ClearAbnormal,
                Action::SelfUpdate(cfg(PRODUCT, "9.9.9-new")),
                Action::SyncPlugins(vec![cfg("driver", "1")]),
            ]
        );
        // Same version: no update, still not a plugin.
        let a = plan(Command {
            task: None,
            configs: vec![cfg(PRODUCT, VERSION)],
            ..Default::default()
        });
        assert_eq!(a, vec![Action::ClearAbnormal, Action::SyncPlugins(vec![])]);
    }

    #[test]
    fn sync_diff_install_upgrade_remove_keep() {
        let running: BTreeMap<String, String> = [("a", "1"), ("b", "1"), ("c", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let p = plan_sync(
            vec![cfg("a", "1"), cfg("b", "2"), cfg("d", "1"), cfg("x/y", "1")],
            &running,
            false,
            names_ok,
        );
        assert!(!p.kept_all);
        assert_eq!(
            p.ops,
            vec![
                PluginOp::Reject {
                    name: "x/y".into(),
                    version: "1".into(),
                    msg: "load plugin \"x/y\" failed: invalid name".into(),
                },
                PluginOp::Remove("c".into()),
                PluginOp::Upgrade(cfg("b", "2")),
                PluginOp::Install(cfg("d", "1")),
            ]
        );
    }

    #[test]
    fn empty_desired_set_keeps_everything_unless_asked() {
        let running: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        let p = plan_sync(vec![], &running, false, names_ok);
        assert_eq!(
            p,
            SyncPlan {
                ops: vec![],
                kept_all: true
            }
        );
        // Only rejected or agent entries: still "empty".
        let p = plan_sync(
            vec![cfg("", "1"), cfg(PRODUCT, "2")],
            &running,
            false,
            names_ok,
        );
        assert!(p.kept_all);
        assert_eq!(p.ops.len(), 1);
        // Elkeid's behaviour on request.
        let p = plan_sync(vec![], &running, true, names_ok);
        assert_eq!(p.ops, vec![PluginOp::Remove("a".into())]);
        // Nothing running: nothing to warn about.
        let p = plan_sync(vec![], &BTreeMap::new(), false, names_ok);
        assert_eq!(p, SyncPlan::default());
    }
}
