#!/bin/sh
# Footprint of the minimal device program (examples/device): static binary
# size per architecture, and RSS while connected to a local broker and
# publishing once a second. Uses loopback ports 18883, 18443, 19464.
set -eu
work=$(mktemp -d)
trap 'pkill -f "$work/device" 2>/dev/null; pkill -f "$work/broker serve" 2>/dev/null; rm -rf "$work"' EXIT
for arch in amd64 arm64 arm; do
	CGO_ENABLED=0 GOOS=linux GOARCH=$arch GOARM=7 go build -trimpath -ldflags "-s -w" -o "$work/device-$arch" ./examples/device
	printf 'binary linux/%s: %s bytes\n' "$arch" "$(stat -c %s "$work/device-$arch")"
done
go build -o "$work/broker" ./cmd/broker
go build -o "$work/devsim" ./cmd/devsim
"$work/broker" init --data "$work/data" >/dev/null
tok=$("$work/broker" token --data "$work/data" --device fp-1)
"$work/broker" serve --data "$work/data" --mqtt-addr 127.0.0.1:18883 --est-addr 127.0.0.1:18443 --metrics-addr 127.0.0.1:19464 2>"$work/broker.log" &
sleep 1
echo "$tok" | "$work/devsim" enroll --est https://127.0.0.1:18443 --ca "$work/data/ca/root.crt" --device fp-1 --token-file - --out "$work/id" >/dev/null
cp "$work/device-amd64" "$work/device"
"$work/device" --broker mqtts://127.0.0.1:18883 --identity "$work/id" --every 1s &
sleep 5
pid=$!
grep -E 'VmRSS|VmHWM' "/proc/$pid/status" | sed 's/^/device (amd64, connected, publishing 1\/s): /'
