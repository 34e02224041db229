#!/bin/sh
# task cluster: a local 3-node broker cluster (embedded NATS) over one
# PostgreSQL registry, to try the scale-out. PostgreSQL runs from Debian's
# binaries in a temporary directory (as the user postgres when run as root:
# it refuses root). Ctrl-C stops everything; CLUSTER_DIR keeps the files.
set -eu

DIR=${CLUSTER_DIR:-$(mktemp -d /tmp/mqtls-cluster.XXXXXX)}
PGPORT=${PGPORT:-55432}
MQTT_BASE=${MQTT_BASE:-18883} # n1 18883, n2 18884, n3 18885
ROUTE_BASE=${ROUTE_BASE:-16222}
EST=${EST:-127.0.0.1:18443}

PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
	echo "cluster: PostgreSQL is missing (/usr/lib/postgresql/*/bin/initdb): sh scripts/deps.sh" >&2
	exit 1
fi
as_pg() {
	if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

mkdir -p "$DIR/pg" "$DIR/bin"
chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown postgres "$DIR/pg"
PW=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
printf '%s\n' "$PW" >"$DIR/pgpass"
chmod 600 "$DIR/pgpass"
cp "$DIR/pgpass" "$DIR/pg/pw"
[ "$(id -u)" = 0 ] && chown postgres "$DIR/pg/pw"
as_pg "$PGBIN/initdb" -D "$DIR/pg/data" -U postgres --pwfile "$DIR/pg/pw" --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >"$DIR/pg/initdb.log"
rm -f "$DIR/pg/pw"
as_pg "$PGBIN/pg_ctl" start -w -D "$DIR/pg/data" -l "$DIR/pg/postgres.log" -o "-h 127.0.0.1 -p $PGPORT -k $DIR/pg" >/dev/null

PIDS=""
stop() {
	trap - INT TERM EXIT
	for p in $PIDS; do kill "$p" 2>/dev/null || true; done
	for p in $PIDS; do wait "$p" 2>/dev/null || true; done
	as_pg "$PGBIN/pg_ctl" stop -D "$DIR/pg/data" -m fast -w >/dev/null || true
	echo "cluster stopped; files in $DIR"
}
trap stop INT TERM EXIT

go build -o "$DIR/bin/broker" ./cmd/broker
go build -o "$DIR/bin/devsim" ./cmd/devsim
REG="--registry postgres://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable --registry-password-file $DIR/pgpass"
# shellcheck disable=SC2086
"$DIR/bin/broker" init --data "$DIR/n1" $REG >/dev/null
cp -a "$DIR/n1" "$DIR/n2"
cp -a "$DIR/n1" "$DIR/n3"

URLS=""
for i in 1 2 3; do
	peers=""
	for j in 1 2 3; do
		[ "$j" = "$i" ] || peers="$peers${peers:+,}127.0.0.1:$((ROUTE_BASE + j - 1))"
	done
	est=""
	[ "$i" = 1 ] && est=$EST
	mqtt=127.0.0.1:$((MQTT_BASE + i - 1))
	URLS="$URLS --broker mqtts://$mqtt"
	# shellcheck disable=SC2086
	"$DIR/bin/broker" serve --data "$DIR/n$i" $REG --mqtt-addr "$mqtt" --est-addr "$est" --metrics-addr "" \
		--node-name "n$i" --cluster-listen "127.0.0.1:$((ROUTE_BASE + i - 1))" --cluster-peers "$peers" \
		2>"$DIR/n$i.log" &
	PIDS="$PIDS $!"
done

echo "waiting for the three nodes (JetStream elects its leaders: ~15 s)..."
n=0
until [ "$(grep -l 'MQTT listening' "$DIR"/n1.log "$DIR"/n2.log "$DIR"/n3.log 2>/dev/null | wc -l)" = 3 ]; do
	n=$((n + 1))
	if [ "$n" -gt 120 ]; then
		echo "cluster: the nodes did not start within 60 s; logs in $DIR/n*.log" >&2
		exit 1
	fi
	sleep 0.5
done
# shellcheck disable=SC2086
"$DIR/bin/broker" token --data "$DIR/n1" $REG --count "${DEVICES:-300}" --prefix sim >"$DIR/tokens"

cat <<EOF
3 nodes up (logs $DIR/n1.log ...), registry PostgreSQL 127.0.0.1:$PGPORT, ${DEVICES:-300} tokens in $DIR/tokens.
Try, in another shell:
  $DIR/bin/devsim run$URLS \\
    --est https://$EST --ca $DIR/n1/ca/root.crt --tokens $DIR/tokens --interval 1s --duration 30s
and kill a node (kill -9 one of:$PIDS) while it runs: its devices move to the others.
Ctrl-C stops the cluster.
EOF
wait
