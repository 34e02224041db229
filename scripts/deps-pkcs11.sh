#!/bin/sh
# Installs the Debian packages the PKCS#11 tests run against, when missing:
# softhsm2 (softhsm2-util and the module /usr/lib/softhsm/libsofthsm2.so)
# and opensc (pkcs11-tool). Needs root (apt-get). Under CI=true a package
# that is still missing is an error; elsewhere the tests that need it skip
# with a message (internal/testing/testtool).
set -eu

module=/usr/lib/softhsm/libsofthsm2.so
missing=""
command -v softhsm2-util >/dev/null 2>&1 || missing="$missing softhsm2"
[ -e "$module" ] || missing="$missing softhsm2"
command -v pkcs11-tool >/dev/null 2>&1 || missing="$missing opensc"
missing=$(echo "$missing" | xargs -n1 2>/dev/null | sort -u | xargs)
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ]; then
	echo "deps-pkcs11: installing $missing" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
	exit 0
fi
echo "deps-pkcs11: missing Debian packages: $missing (run as root, or: sudo apt-get install $missing)" >&2
if [ "${CI:-}" = true ]; then
	exit 1
fi
