# UCI file -> shell assignments (see uci-shim.sh). Values are emitted in
# single quotes with embedded quotes escaped, so eval is safe.
function q(s) { gsub(/'/, "'\\''", s); return "'" s "'" }
function tokens(line,    n, i, c, cur, inq, started) {
	n = 0; cur = ""; inq = ""; started = 0
	for (i = 1; i <= length(line); i++) {
		c = substr(line, i, 1)
		if (inq == "'") {
			if (c == "'") inq = ""; else cur = cur c
		} else if (inq == "\"") {
			if (c == "\\" && i < length(line)) { i++; cur = cur substr(line, i, 1) }
			else if (c == "\"") inq = ""
			else cur = cur c
		} else if (c == "#" && !started) {
			break
		} else if (c == " " || c == "\t") {
			if (started) { tok[++n] = cur; cur = ""; started = 0 }
		} else if (c == "'" || c == "\"") {
			inq = c; started = 1
		} else if (c == "\\" && i < length(line)) {
			i++; cur = cur substr(line, i, 1); started = 1
		} else {
			cur = cur c; started = 1
		}
	}
	if (inq != "") { printf "uci-load: %s:%d: unterminated quote\n", FILENAME, FNR > "/dev/stderr"; exit 1 }
	if (started) tok[++n] = cur
	return n
}
function ident(s) {
	if (s !~ /^[A-Za-z0-9_]+$/) { printf "uci-load: %s:%d: bad name '%s'\n", FILENAME, FNR, s > "/dev/stderr"; exit 1 }
	return s
}
{
	n = tokens($0)
	if (n == 0) next
	if (tok[1] == "config") {
		sec = (n >= 3) ? ident(tok[3]) : sprintf("cfg%02d", ++anon)
		print "CONFIG_" sec "_TYPE=" q(tok[2])
		next
	}
	if (sec == "") { printf "uci-load: %s:%d: option outside a section\n", FILENAME, FNR > "/dev/stderr"; exit 1 }
	if (n != 3) { printf "uci-load: %s:%d: expected KEYWORD NAME VALUE\n", FILENAME, FNR > "/dev/stderr"; exit 1 }
	name = "CONFIG_" sec "_" ident(tok[2])
	if (tok[1] == "option") {
		print name "=" q(tok[3])
	} else if (tok[1] == "list") {
		len[name]++
		print name "_ITEM" len[name] "=" q(tok[3])
		print name "_LENGTH=" len[name]
		joined[name] = (len[name] > 1) ? joined[name] " " tok[3] : tok[3]
		print name "=" q(joined[name])
	} else {
		printf "uci-load: %s:%d: unknown keyword '%s'\n", FILENAME, FNR, tok[1] > "/dev/stderr"; exit 1
	}
}
