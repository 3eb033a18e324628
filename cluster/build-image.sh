#!/usr/bin/env bash
# Build and push the cluster image (cluster/Dockerfile), then point every cluster config at it.
#   bash cluster/build-image.sh ghcr.io/your-org/nanochat-ray:2.60.0-py311-cu128-torch2.9.1
# Needs docker (buildx) and a `docker login` to the registry. Writes the name to cluster/image.env and replaces the
# previous name in the ray up YAMLs and the KubeRay kustomization (tests/test_cluster_configs.py checks they agree).
set -euo pipefail
cd "$(dirname "$0")/.."
NEW=${1:?usage: bash cluster/build-image.sh REGISTRY/nanochat-ray:TAG}
OLD=$(sed -n 's/^NANOCHAT_IMAGE=//p' cluster/image.env)
docker build -f cluster/Dockerfile -t "$NEW" .
docker push "$NEW"
for f in cluster/image.env cluster/*.yaml cluster/kuberay/*.yaml; do
  sed -i "s|${OLD%:*}:${OLD##*:}|$NEW|g; s|newName: ${OLD%:*}\$|newName: ${NEW%:*}|; s|newTag: \"${OLD##*:}\"|newTag: \"${NEW##*:}\"|" "$f"
done
echo "image: $NEW (cluster/image.env and every config updated)"
