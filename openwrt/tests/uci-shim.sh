# A stand-in for the parts of OpenWrt's /lib/functions.sh that the init
# script uses (config_load, config_get, config_get_bool, config_list_foreach),
# for running it under a plain POSIX sh in openwrt/test.sh. Sourced.
#
# config_load NAME reads "$UCI_CONFIG_DIR/NAME" (UCI syntax: `config TYPE
# [NAME]`, `option KEY VALUE`, `list KEY VALUE`, # comments, values bare or
# in single quotes (literal) or double quotes (backslash escapes)) and sets
# the same variables functions.sh does: CONFIG_<section>_<option>, and for
# lists CONFIG_<section>_<option>_ITEM<n> / _LENGTH plus the space-joined
# CONFIG_<section>_<option>.
# shellcheck shell=sh

config_load() {
	_uci_file="${UCI_CONFIG_DIR:-/etc/config}/$1"
	[ -r "$_uci_file" ] || { echo "uci-shim: cannot read $_uci_file" >&2; return 1; }
	_uci_code="$(awk -f "${UCI_SHIM_DIR:-.}/uci-load.awk" "$_uci_file")" || return 1
	eval "$_uci_code"
}

config_get() {
	# config_get VAR SECTION OPTION [DEFAULT]: DEFAULT when unset or empty.
	eval "$1=\${CONFIG_${2}_${3}:-\$4}"
}

config_get_bool() {
	_uci_b=""
	config_get _uci_b "$2" "$3" "$4"
	case "$_uci_b" in
	1 | on | true | yes | enabled) _uci_b=1 ;;
	0 | off | false | no | disabled) _uci_b=0 ;;
	*) _uci_b="$4" ;;
	esac
	eval "$1=\$_uci_b"
}

config_list_foreach() {
	# config_list_foreach SECTION OPTION FUNCTION [ARGS...]
	_uci_s="$1" _uci_o="$2" _uci_f="$3"
	shift 3
	_uci_len=0 _uci_v=""
	eval "_uci_len=\${CONFIG_${_uci_s}_${_uci_o}_LENGTH:-0}"
	_uci_i=1
	while [ "$_uci_i" -le "$_uci_len" ]; do
		eval "_uci_v=\${CONFIG_${_uci_s}_${_uci_o}_ITEM${_uci_i}}"
		"$_uci_f" "$_uci_v" "$@"
		_uci_i=$((_uci_i + 1))
	done
}

# Stand-ins for the procd helpers: record every call, one per line.
procd_open_instance() { echo "open_instance $*" >>"$PROCD_LOG"; }
procd_set_param() { echo "set_param $*" >>"$PROCD_LOG"; }
procd_append_param() { echo "append_param $*" >>"$PROCD_LOG"; }
procd_close_instance() { echo "close_instance" >>"$PROCD_LOG"; }
procd_add_reload_trigger() { echo "add_reload_trigger $*" >>"$PROCD_LOG"; }
logger() { :; }
