//! The record schema shared by the agent, the center and the tests: data
//! types (`Record.data_type` / `Command.task.data_type`) and the payload keys
//! of the records the agent builds itself.
//!
//! These are wire facts (spec §3 and §5): changing a value breaks
//! compatibility with real Elkeid peers. Plugin records (any other data type)
//! are opaque to agent and center.

/// Data type numbers.
pub mod data_type {
    /// Agent heartbeat, every 60 s ([`super::heartbeat`] keys).
    pub const AGENT_HEARTBEAT: i32 = 1000;
    /// Plugin heartbeat, one per running plugin ([`super::plugin_heartbeat`] keys).
    pub const PLUGIN_HEARTBEAT: i32 = 1001;
    /// Agent log line ([`super::agent_log`] keys).
    pub const AGENT_LOG: i32 = 1010;
    /// Agent log line, second kind (Elkeid's center treats it like 1010).
    pub const AGENT_LOG_2: i32 = 1011;
    /// Task (center -> agent): upload a file over the `FileUpload` stream.
    pub const TASK_UPLOAD: i32 = 1050;
    /// Task (center -> agent): set metadata (`idc`, `region`).
    pub const TASK_SET_META: i32 = 1051;
    /// Task (center -> agent): shut the agent down.
    pub const TASK_SHUTDOWN: i32 = 1060;
    /// Task result: command or file-upload outcome ([`super::task_result`] keys).
    pub const TASK_RESULT: i32 = 5100;
    /// Task result, second kind.
    pub const TASK_RESULT_2: i32 = 5101;
    /// Task result from the collector plugin.
    pub const COLLECTOR_RESULT: i32 = 6000;
    /// Task result from the driver plugin (kernel module status).
    pub const DRIVER_RESULT: i32 = 2001;
    /// Task result from the driver plugin (second kind).
    pub const DRIVER_RESULT_2: i32 = 2003;
    /// Task result from the scanner plugin.
    pub const SCANNER_RESULT: i32 = 8010;

    /// Records the center hands to the manager's task-result queue.
    pub const TASK_RESULTS: [i32; 6] = [
        DRIVER_RESULT,
        DRIVER_RESULT_2,
        COLLECTOR_RESULT,
        TASK_RESULT,
        TASK_RESULT_2,
        SCANNER_RESULT,
    ];
    /// Tasks the agent runs itself (task `name` is the agent's product name).
    pub const AGENT_TASKS: [i32; 3] = [TASK_UPLOAD, TASK_SET_META, TASK_SHUTDOWN];

    /// True for the data types the center treats as agent logs.
    pub const fn is_agent_log(dt: i32) -> bool {
        dt == AGENT_LOG || dt == AGENT_LOG_2
    }

    /// True for the data types that are task results.
    pub const fn is_task_result(dt: i32) -> bool {
        let mut i = 0;
        while i < TASK_RESULTS.len() {
            if TASK_RESULTS[i] == dt {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Payload keys of the agent heartbeat (1000), in the order the agent
/// writes them (spec §3.8, plus our own counters at the end).
pub mod heartbeat {
    /// Every key of a 1000 record.
    pub const KEYS: [&str; 45] = [
        "kernel_version",
        "arch",
        "platform",
        "platform_family",
        "platform_version",
        "state",
        "state_detail",
        "idc",
        "region",
        "net_mode",
        "rx_speed",
        "tx_speed",
        "cpu",
        "rss",
        "read_speed",
        "write_speed",
        "pid",
        "nfd",
        "start_time",
        "tx_tps",
        "rx_tps",
        "du",
        "ngr",
        "nproc",
        "total_mem",
        "load_1",
        "load_5",
        "load_15",
        "running_procs",
        "total_procs",
        "host_serial",
        "host_id",
        "host_model",
        "host_vendor",
        "dns",
        "gateway",
        "cpu_name",
        "boot_time",
        "cpu_usage",
        "mem_usage",
        "drop_cnt",
        "ring_len",
        "ring_bytes",
        "reconnects",
        "hb_seq",
    ];
    /// Keys the center keeps as strings in the stored detail (everything
    /// else that parses as a number becomes a JSON number).
    pub const STRING_KEYS: [&str; 7] = [
        "platform_version",
        "version",
        "host_serial",
        "host_id",
        "host_model",
        "host_vendor",
        "cpu_name",
    ];
}

/// Payload keys of the plugin heartbeat (1001).
pub mod plugin_heartbeat {
    /// Every key of a 1001 record.
    pub const KEYS: [&str; 14] = [
        "name",
        "pversion",
        "cpu",
        "rss",
        "read_speed",
        "write_speed",
        "pid",
        "nfd",
        "start_time",
        "du",
        "rx_tps",
        "tx_tps",
        "rx_speed",
        "tx_speed",
    ];
    /// The key naming the plugin (the stored detail is keyed by it).
    pub const NAME: &str = "name";
    /// Keys the center keeps as strings.
    pub const STRING_KEYS: [&str; 1] = ["pversion"];
}

/// Payload keys of the agent log record (1010).
pub mod agent_log {
    /// Always `"error"` today.
    pub const LEVEL: &str = "level";
    /// Where it came from: a source location, or `"plugin"`.
    pub const SOURCE: &str = "source";
    /// The tracing target (agent events only).
    pub const TARGET: &str = "target";
    /// The message.
    pub const MSG: &str = "msg";
    /// The plugin name (plugin problems only).
    pub const PLUGIN: &str = "plugin";
    /// The plugin version (plugin problems only).
    pub const PLUGIN_VERSION: &str = "pver";
    /// Keys of an agent event.
    pub const AGENT_KEYS: [&str; 4] = [LEVEL, SOURCE, TARGET, MSG];
    /// Keys of a plugin problem report.
    pub const PLUGIN_KEYS: [&str; 5] = [LEVEL, SOURCE, MSG, PLUGIN, PLUGIN_VERSION];
}

/// Payload keys of a task result (5100).
pub mod task_result {
    /// The task's token.
    pub const TOKEN: &str = "token";
    /// `"succeed"` or `"failed"`.
    pub const STATUS: &str = "status";
    /// Human-readable detail.
    pub const MSG: &str = "msg";
    /// Every key.
    pub const KEYS: [&str; 3] = [TOKEN, MSG, STATUS];
    /// [`STATUS`] value on success.
    pub const SUCCEED: &str = "succeed";
    /// [`STATUS`] value on failure.
    pub const FAILED: &str = "failed";
}

#[cfg(test)]
mod tests {
    use super::data_type::*;

    #[test]
    fn classification() {
        for dt in TASK_RESULTS {
            assert!(is_task_result(dt));
            assert!(!is_agent_log(dt));
        }
        assert!(is_agent_log(1010) && is_agent_log(1011));
        assert!(!is_task_result(1000) && !is_task_result(1050));
        assert_eq!(TASK_RESULTS, [2001, 2003, 6000, 5100, 5101, 8010]);
        assert_eq!(AGENT_TASKS, [1050, 1051, 1060]);
    }

    #[test]
    fn key_lists_have_no_duplicates() {
        fn uniq(keys: &[&str]) {
            for (i, k) in keys.iter().enumerate() {
                assert!(!keys[..i].contains(k), "{k} twice");
            }
        }
        uniq(&super::heartbeat::KEYS);
        uniq(&super::plugin_heartbeat::KEYS);
        uniq(&super::agent_log::PLUGIN_KEYS);
        uniq(&super::task_result::KEYS);
    }
}
