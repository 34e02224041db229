#!/bin/sh
# Installs the Debian packages the tests run against, when missing.
# Needs root (apt-get). Under CI=true a tool that is still missing is an
# error; elsewhere the tests that need it skip with a message.
set -eu

# program:package pairs
tools="swtpm:swtpm swtpm_setup:swtpm-tools tpm2_load:tpm2-tools openssl:openssl curl:curl
mosquitto:mosquitto mosquitto_pub:mosquitto-clients runuser:util-linux unshare:util-linux
ip:iproute2 systemd-analyze:systemd git:git"
# openssl's tpm2 provider is a library, not a program
provider=/usr/lib/$(uname -m)-linux-gnu/ossl-modules/tpm2.so

check() {
	missing=""
	for pair in $tools; do
		command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
	done
	[ -e "$provider" ] || missing="$missing tpm2-openssl"
	# mosquitto lives in /usr/sbin, which is not on every PATH
	[ -x /usr/sbin/mosquitto ] && missing=$(echo "$missing" | sed 's/ mosquitto\( \|$\)/ /')
	# the PostgreSQL server (internal/testing/pgtest) is not on PATH either
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
	missing=$(echo "$missing" | xargs -n1 2>/dev/null | sort -u | xargs)
}

check
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ]; then
	echo "deps: installing $missing" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
	check
	[ -z "$missing" ] && exit 0
	echo "deps: still missing after apt-get install: $missing" >&2
else
	echo "deps: missing Debian packages: $missing (run as root, or: sudo apt-get install $missing)" >&2
fi
if [ "${CI:-}" = true ]; then
	exit 1
fi
