#!/usr/bin/env bash
# Multi-node GPU training without a scheduler: run this on every host with the same COORDINATOR
# (host 0's address:port), NUM_PROCESSES and its own PROCESS_ID. JAX reads the JAX_* variables.
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 ./launch/gpu_hosts.sh stage2 /shared/w/stage2
source "$(dirname "$0")/common.sh"
STAGE=${1:?stage}; WORKDIR=${2:?workdir}; shift 2
export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?host:port of process 0}
export JAX_NUM_PROCESSES=${NUM_PROCESSES:?} JAX_PROCESS_ID=${PROCESS_ID:?}
run python -m emu2_jax.train --config="configs/$STAGE.py" --workdir="$WORKDIR" --distributed=on "$@"
