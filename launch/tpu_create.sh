#!/usr/bin/env bash
# Creates a TPU VM slice (single- or multi-host) through a queued resource, spot by default.
# Idempotent: does nothing when the queued resource already exists.
#   ACCELERATOR=v5p-256 TPU_NAME=emu2 ZONE=us-east5-a ./launch/tpu_create.sh
#   DRY_RUN=1 ./launch/tpu_create.sh          # print only
# Multislice: set NODE_COUNT=2 (N slices of ACCELERATOR joined by DCN; jax sees all chips as one mesh,
# the `data` mesh axis should then span the slices: --config.mesh_shape="(2,-1,4)").
source "$(dirname "$0")/common.sh"
: "${ACCELERATOR:=v5p-256}" "${RUNTIME:=v2-alpha-tpuv5}" "${SPOT:=1}" "${NODE_COUNT:=1}"
if [[ "${DRY_RUN:-0}" != 1 ]] && gcloud compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" \
     --project "$PROJECT" >/dev/null 2>&1; then
  echo "queued resource $TPU_NAME exists in $ZONE: nothing to do"; exit 0
fi
args=(--zone "$ZONE" --project "$PROJECT" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME")
if [[ "$NODE_COUNT" -gt 1 ]]; then args+=(--node-count "$NODE_COUNT" --node-prefix "$TPU_NAME"); else args+=(--node-id "$TPU_NAME"); fi
[[ "$SPOT" == 1 ]] && args+=(--spot)
run gcloud compute tpus queued-resources create "$TPU_NAME" "${args[@]}"
echo "wait for ACTIVE: gcloud compute tpus queued-resources describe $TPU_NAME --zone $ZONE"
