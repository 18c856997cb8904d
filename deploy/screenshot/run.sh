#!/usr/bin/env bash
# Takes deploy/screenshot/castellan-under-load.png (and alerts.png): a real
# castellan serve under bin/loadgen, scraped by Debian's prometheus with the
# chart's PrometheusRule loaded, and castellan.html (a Prometheus console with
# the Grafana dashboard's key queries) shot by headless Chromium. Not part of
# `make test`; run it with `make screenshot`, which builds the binaries and
# helm first. Needs: apt-get install -y prometheus chromium.
#
# The load is short and niced, for a shared machine: LOAD_SECONDS per phase
# (default 90), 4 then 16 clients, plus operator requests the server refuses
# (at most one a second) so that refusals show too.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT_DIR:-deploy/screenshot}
HELM=${HELM:?set HELM to a helm binary (make screenshot does)}
LOAD_SECONDS=${LOAD_SECONDS:-90}
for c in prometheus promtool chromium python3; do
  command -v "$c" >/dev/null || { echo "$c not found: apt-get install -y prometheus chromium python3" >&2; exit 1; }
done
for b in bin/castellan bin/castellanctl bin/loadgen; do
  [ -x "$b" ] || { echo "$b missing: run make screenshot (it builds them)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC=$(port) MON=$(port) PROM=$(port)

# The server: self-signed root with a generated intermediate, embedded audit
# store; the per-caller rate limit off as bin/loadgen does (each client
# renews one identity as fast as it can).
data="$work/castellan"
nice -n 10 bin/castellan serve --data-dir "$data" --listen "127.0.0.1:$GRPC" --monitoring-listen "127.0.0.1:$MON" \
  --log-level warn --caller-rate-limit 0 --intermediate-lifetime 720h >"$work/castellan.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$data/server.json" ] && curl -fs "http://127.0.0.1:$MON/readyz" >/dev/null && break; sleep 0.2; done
curl -fs "http://127.0.0.1:$MON/readyz" >/dev/null || { cat "$work/castellan.log" >&2; exit 1; }

# The chart's alerts as a rules file: a PrometheusRule's spec is one.
"$HELM" template castellan deploy/helm/castellan --set monitoring.prometheusRule.enabled=true \
  --show-only templates/prometheusrule.yaml | sed -n '/^spec:/,$p' | tail -n +2 | sed 's/^  //' >"$work/rules.yaml"
promtool check rules "$work/rules.yaml"
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files: [$work/rules.yaml]
scrape_configs:
  - job_name: castellan
    static_configs:
      - targets: ["127.0.0.1:$MON"]
YAML
mkdir -p "$work/consoles" "$work/console_libraries"
cp deploy/screenshot/castellan.html "$work/consoles/"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
  --web.listen-address="127.0.0.1:$PROM" --web.console.templates="$work/consoles" \
  --web.console.libraries="$work/console_libraries" >"$work/prometheus.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PROM/-/ready" >/dev/null && break; sleep 0.2; done

# Refused requests beside the load: a foreign trust domain, a lifetime past the maximum.
(while :; do
  bin/castellanctl --data-dir "$data" issue --identity spiffe://elsewhere.example/ns/a/sa/b --out-dir "$work/x" >/dev/null 2>&1 || true
  sleep 1
  bin/castellanctl --data-dir "$data" issue --identity spiffe://cluster.local/ns/a/sa/b --ttl 9000h --out-dir "$work/x" >/dev/null 2>&1 || true
  sleep 1
done) &
pids+=($!)

sleep 15
for clients in 4 16; do
  nice -n 10 bin/loadgen -mode castellan -data-dir "$data" -clients "$clients" -duration "${LOAD_SECONDS}s" -report 0
done
sleep 12 # the last scrapes

mkdir -p "$OUT_DIR"
shot() { # url file height
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --window-size="1400,$3" --virtual-time-budget=15000 --screenshot="$2" "$1" 2>/dev/null
}
shot "http://127.0.0.1:$PROM/consoles/castellan.html" "$OUT_DIR/castellan-under-load.png" 1080
shot "http://127.0.0.1:$PROM/classic/alerts" "$OUT_DIR/alerts.png" 900 # Debian ships the classic UI
ls -l "$OUT_DIR"/*.png
