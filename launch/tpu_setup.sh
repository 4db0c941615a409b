#!/usr/bin/env bash
# Installs the project on every worker of the slice (clone or pull, then pip install with TPU jax).
# Idempotent: re-running pulls and reinstalls in place.
#   TPU_NAME=emu2 ZONE=us-east5-a ./launch/tpu_setup.sh
source "$(dirname "$0")/common.sh"
: "${REF:=main}"
remote="set -e; [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR; cd $REPO_DIR && git fetch -q && git checkout -q $REF \
&& git pull -q --ff-only || true; python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip \
&& ~/venv/bin/pip install -q 'jax[tpu]' -e . && ~/venv/bin/python -c 'import jax; print(jax.device_count())'"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$remote"
