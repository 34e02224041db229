#!/bin/sh
# licenses: mqtls is Apache-2.0 (LICENSE). Every module linked into its
# packages and tests must carry a license compatible with that: this lists
# each module with the license its LICENSE/COPYING file reads as, and fails
# on a module whose license it cannot recognise or on a copyleft one that an
# Apache-2.0 binary may not link (GPL, LGPL, AGPL, SSPL, EUPL).
#
#   sh scripts/licenses.sh       the check (run by task lint)
#   sh scripts/licenses.sh -v    also prints module, version and license
set -eu
cd "$(dirname "$0")/.."

fail=0
if ! head -3 LICENSE 2>/dev/null | grep -q 'Apache License' || ! grep -q 'Version 2.0, January 2004' LICENSE; then
	echo "licenses: LICENSE at the root is not the Apache License 2.0 text" >&2
	fail=1
fi

# classify FILE: prints an SPDX identifier, or "unknown".
classify() {
	t=$(head -c 4000 "$1" | tr '\n' ' ')
	case "$t" in
	# first: the EPL-2.0 names the GPL as a possible secondary license
	*"Eclipse Public License - v 2.0"*"Eclipse Distribution License v1.0"*) echo "EPL-2.0 OR BSD-3-Clause" ;;
	*"GNU GENERAL PUBLIC"* | *"GNU LESSER"* | *"GNU AFFERO"* | *"GNU Lesser"* | *"GNU General"* | *"GNU Affero"*) echo GPL-family ;;
	*"Server Side Public License"* | *"European Union Public Licence"*) echo copyleft ;;
	*"covered by two different licenses: MIT and Apache"*) echo "MIT AND Apache-2.0" ;;
	*"Apache License"*"Version 2.0"*) echo Apache-2.0 ;;
	*"Mozilla Public License"*"2.0"*) echo MPL-2.0 ;;
	*"Permission is hereby granted, free of charge"*) echo MIT ;;
	*"Permission to use, copy, modify, and"*"distribute this software for any"*) echo ISC ;;
	*"Redistribution and use in source and binary forms"*"Neither the name"* | \
		*"Redistribution and use in source and binary forms"*"names of its contributors"* | \
		*"Redistribution and use in source and binary forms"*"name of the copyright holder"*) echo BSD-3-Clause ;;
	*"Redistribution and use in source and binary forms"*) echo BSD-2-Clause ;;
	*) echo unknown ;;
	esac
}

mods=$(go list -deps -test -f '{{with .Module}}{{if not .Main}}{{.Path}}@{{.Version}}|{{.Dir}}{{end}}{{end}}' ./... | sort -u)
n=0
for m in $mods; do
	mod=${m%%|*} dir=${m#*|}
	f=$(ls "$dir" | grep -i -E '^(licen[cs]e|copying)' | head -1 || true)
	lic=unknown
	[ -n "$f" ] && lic=$(classify "$dir/$f")
	n=$((n + 1))
	[ "${1:-}" = "-v" ] && printf '%-70s %s\n' "$mod" "$lic"
	case "$lic" in
	unknown) echo "licenses: $mod: no license file recognised (${f:-none}): read it and add it to scripts/licenses.sh" >&2; fail=1 ;;
	GPL-family | copyleft) echo "licenses: $mod is $lic: not compatible with linking into Apache-2.0 mqtls" >&2; fail=1 ;;
	esac
done
if [ $fail != 0 ]; then
	echo "licenses: FAILED" >&2
	exit 1
fi
echo "licenses: LICENSE is Apache-2.0; the $n modules linked into mqtls and its tests are MIT, BSD, ISC, Apache-2.0, MPL-2.0 or EPL-2.0/BSD-3-Clause"
