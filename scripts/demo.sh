#!/usr/bin/env bash
# A local multi-node VX6 demo on loopback: five nodes in temporary homes,
# an HTTP service published by alice, reached directly by address (TCP and
# QUIC), by name, and through a 3-relay onion circuit. Everything is cleaned up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building vx6 (release)"
cargo build --release -q -p vx6-cli
VX6="$PWD/target/release/vx6"

work=$(mktemp -d /tmp/vx6-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for CMD... : retry for up to 15 s
  for _ in $(seq 1 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for: $*" >&2; return 1
}
fetch() { python3 -c 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())' "$1"; }

# The service alice publishes: a tiny HTTP server that only listens on localhost.
mkdir -p "$work/site"
echo "hello from alice's localhost web server" > "$work/site/index.html"
http_port=$(free_port)
python3 -m http.server "$http_port" --bind 127.0.0.1 --directory "$work/site" >/dev/null 2>&1 &
pids+=($!)

ports=()
for n in alice bob carol dave erin; do
  p=$(free_port); ports+=("$p")
  peer_args=()
  [ "$n" != alice ] && peer_args=(--peer "[::1]:${ports[0]}")
  "$VX6" --home "$work/$n" init --name "$n" --listen "[::1]:$p" "${peer_args[@]}" >/dev/null
  VX6_LOG=warn "$VX6" --home "$work/$n" node >"$work/$n.log" 2>&1 &
  pids+=($!)
  wait_for "$VX6" --home "$work/$n" status
done
alice_id=$("$VX6" --home "$work/alice" identity --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["node_id"])')
echo "== alice is $alice_id on [::1]:${ports[0]}"

"$VX6" --home "$work/alice" service add web "127.0.0.1:$http_port"

echo "== direct mode: bob → [::1]:${ports[0]} service web (pinned to alice's id)"
l1=$(free_port)
"$VX6" --home "$work/bob" connect --addr "[::1]:${ports[0]}" --service web --node "$alice_id" --listen "127.0.0.1:$l1" --detach
echo "   GET http://127.0.0.1:$l1/ → $(fetch "http://127.0.0.1:$l1/")"

echo "== direct mode over QUIC"
l2=$(free_port)
"$VX6" --home "$work/bob" connect --addr "[::1]:${ports[0]}" --service web --transport quic --listen "127.0.0.1:$l2" --detach
echo "   GET http://127.0.0.1:$l2/ → $(fetch "http://127.0.0.1:$l2/")"

echo "== named mode: carol → alice.web (resolved through the network)"
wait_for "$VX6" --home "$work/carol" resolve alice.web
"$VX6" --home "$work/carol" resolve alice.web
l3=$(free_port)
"$VX6" --home "$work/carol" connect alice.web --listen "127.0.0.1:$l3" --detach
echo "   GET http://127.0.0.1:$l3/ → $(fetch "http://127.0.0.1:$l3/")"

echo "== relay mode: carol → alice.web through 3 relays (bob, dave, erin in some order)"
l5=$(free_port)
"$VX6" --home "$work/carol" connect alice.web --via relay --listen "127.0.0.1:$l5" --detach
echo "   GET http://127.0.0.1:$l5/ → $(fetch "http://127.0.0.1:$l5/")"
"$VX6" --home "$work/carol" status --json | python3 -c 'import json,sys; c=json.load(sys.stdin)["circuits"]["own"]; print("   circuits built:", c["built"], " setup ms:", c["last_setup_ms"])'

echo "== a wrong node id is refused"
l4=$(free_port)
if "$VX6" --home "$work/carol" connect --addr "[::1]:${ports[1]}" --service web --node "$alice_id" --listen "127.0.0.1:$l4" --detach 2>"$work/err"; then
  echo "   unexpected: connected" >&2; exit 1
fi
echo "   refused: $(cat "$work/err")"

echo "== demo finished; cleaning up"
