#!/usr/bin/env bash
# Prometheus + Grafana on the Ray head, wired to the dashboard (run by head_start_ray_commands after `ray start`).
# Uses the configs Ray generated for this session (metrics/prometheus/prometheus.yml scrapes every node listed in
# the session's prom_metrics_service_discovery.json; metrics/grafana/ provisions Ray's dashboards and a Prometheus
# datasource at RAY_PROMETHEUS_HOST) and adds nanochat's dashboard (cluster/monitoring/nanochat-dashboard.json).
# The head container sets RAY_PROMETHEUS_HOST / RAY_GRAFANA_HOST / RAY_GRAFANA_IFRAME_HOST, so the dashboard's
# Metrics tab embeds Grafana: forward ports 8265 and 3000 (cluster/README.md, "Watch").
set -euo pipefail
SESSION=${RAY_SESSION_DIR:-/tmp/ray/session_latest}
METRICS="$SESSION/metrics"
HERE="$(cd "$(dirname "$0")" && pwd)"
for _ in $(seq 90); do
  [ -f "$METRICS/prometheus/prometheus.yml" ] && [ -f "$METRICS/grafana/grafana.ini" ] && break
  sleep 2
done
mkdir -p "$METRICS/grafana/dashboards"
cp "$HERE/nanochat-dashboard.json" "$METRICS/grafana/dashboards/"
pgrep -f "prometheus --config.file=$METRICS" >/dev/null || nohup prometheus --config.file="$METRICS/prometheus/prometheus.yml" \
  --storage.tsdb.path=/tmp/ray/prometheus-data --web.listen-address=127.0.0.1:9090 > /tmp/ray/prometheus.log 2>&1 &
pgrep -f "grafana server" >/dev/null || nohup grafana server --homepath /opt/grafana \
  --config "$METRICS/grafana/grafana.ini" web > /tmp/ray/grafana.log 2>&1 &
echo "monitoring: Prometheus 127.0.0.1:9090, Grafana 127.0.0.1:3000 (logs in /tmp/ray/prometheus.log, grafana.log)"
