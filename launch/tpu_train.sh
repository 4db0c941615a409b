#!/usr/bin/env bash
# Runs a stage on every worker of the slice (one JAX process per host; --distributed=on makes them
# one job). Resume after preemption = run the same command again: training continues from the
# latest checkpoint in WORKDIR (a gs:// path shared by all hosts).
#   STAGE=stage2 WORKDIR=gs://bucket/emu2/stage2 ./launch/tpu_train.sh --config.init_from=gs://bucket/emu2/stage1_448
# Check first that the step fits: python -m emu2_jax.aot --config=configs/$STAGE.py --topology=$ACCELERATOR
source "$(dirname "$0")/common.sh"
: "${STAGE:?set STAGE (a configs/<stage>.py)}" "${WORKDIR:?set WORKDIR (gs://... shared by all workers)}"
extra=$(printf ' %q' "$@")
remote="cd $REPO_DIR && nohup ~/venv/bin/python -m emu2_jax.train --config=configs/$STAGE.py --workdir=$WORKDIR \
--distributed=on$extra > ~/train_$STAGE.log 2>&1 &"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$remote"
echo "logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f ~/train_$STAGE.log'"
