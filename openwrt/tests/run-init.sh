# Runs functions of openwrt/files/elkeid-agent.init outside OpenWrt, under
# any POSIX sh (dash, busybox ash, bash --posix), with uci-shim.sh standing
# in for /lib/functions.sh and procd:
#
#   sh openwrt/tests/run-init.sh gen-config UCI_FILE          -> TOML on stdout
#   sh openwrt/tests/run-init.sh start-service UCI_FILE CONF PROCD_LOG
#
# shellcheck shell=sh
set -u
here="$(cd "$(dirname "$0")" && pwd)"
mode="$1"
uci_file="$2"

UCI_SHIM_DIR="$here"
UCI_CONFIG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/elkeid-uci.XXXXXX")"
trap 'rm -rf "$UCI_CONFIG_DIR"' EXIT
cp "$uci_file" "$UCI_CONFIG_DIR/elkeid-agent"
export UCI_SHIM_DIR UCI_CONFIG_DIR

# shellcheck source=openwrt/tests/uci-shim.sh
. "$here/uci-shim.sh"
# shellcheck source=openwrt/files/elkeid-agent.init
. "$here/../files/elkeid-agent.init"

case "$mode" in
gen-config)
	config_load elkeid-agent || exit 2
	elkeid_agent_gen_config main
	;;
start-service)
	ELKEID_AGENT_CONF="$3"
	PROCD_LOG="$4"
	: >"$PROCD_LOG"
	start_service
	rc=$?
	service_triggers
	exit "$rc"
	;;
*)
	echo "run-init.sh: unknown mode $mode" >&2
	exit 2
	;;
esac
