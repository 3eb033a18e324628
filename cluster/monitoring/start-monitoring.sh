#!/usr/bin/env bash
# Prometheus + Grafana on the Ray head, wired to the dashboard (run by head_start_ray_commands after `ray start`).
# Uses the configs Ray generated for this session (metrics/prometheus/prometheus.yml scrapes every node listed in
# the session's prom_metrics_service_discovery.json; metrics/grafana/ provisions Ray's dashboards and a Prometheus
# datasource at RAY_PROMETHEUS_HOST) and adds nanochat's dashboard (cluster/monitoring/nanochat-dashboard.json).
# The head container sets RAY_PROMETHEUS_HOST / RAY_GRAFANA_HOST / RAY_GRAFANA_IFRAME_HOST, so the dashboard's
# Metrics tab embeds Grafana: forward ports 8265 and 3000 (cluster/README.md, "Watch").
# Settings (environment): RAY_SESSION_DIR (default /tmp/ray/session_latest), MONITORING_DIR for pid files, logs and
# Prometheus data (default /tmp/ray), PROMETHEUS_PORT (9090), PROMETHEUS_SCRAPE_INTERVAL (Ray's: 10s).
set -euo pipefail
SESSION=${RAY_SESSION_DIR:-/tmp/ray/session_latest}
METRICS="$SESSION/metrics"
STATE=${MONITORING_DIR:-/tmp/ray}
HERE="$(cd "$(dirname "$0")" && pwd)"
for _ in $(seq 90); do
  [ -f "$METRICS/prometheus/prometheus.yml" ] && [ -f "$METRICS/grafana/grafana.ini" ] && break
  sleep 2
done
mkdir -p "$METRICS/grafana/dashboards" "$STATE"
cp "$HERE/nanochat-dashboard.json" "$METRICS/grafana/dashboards/"
PROM_CONFIG="$METRICS/prometheus/prometheus.yml"
if [ -n "${PROMETHEUS_SCRAPE_INTERVAL:-}" ]; then
  sed "s/scrape_interval: [0-9]*s/scrape_interval: $PROMETHEUS_SCRAPE_INTERVAL/" "$PROM_CONFIG" > "$STATE/prometheus.yml"
  PROM_CONFIG="$STATE/prometheus.yml"
fi
start() {  # NAME COMMAND...: start once (a pid file in $STATE), detached, with its log next to it
  local name=$1; shift
  if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then return; fi
  nohup "$@" > "$STATE/$name.log" 2>&1 &
  echo $! > "$STATE/$name.pid"
}
start prometheus prometheus --config.file="$PROM_CONFIG" --storage.tsdb.path="$STATE/prometheus-data" \
  --web.listen-address="127.0.0.1:${PROMETHEUS_PORT:-9090}"
if command -v grafana > /dev/null; then
  start grafana grafana server --homepath /opt/grafana --config "$METRICS/grafana/grafana.ini" web
else
  echo "monitoring: no grafana binary here (the cluster image has one); Prometheus only"
fi
echo "monitoring: Prometheus 127.0.0.1:${PROMETHEUS_PORT:-9090}, Grafana 127.0.0.1:3000 (pids and logs in $STATE)"
