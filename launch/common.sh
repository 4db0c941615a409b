# Sourced by the launch scripts: `run CMD...` prints the command, then runs it unless DRY_RUN=1.
set -euo pipefail
run() {
  echo "+ $*"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}
: "${TPU_NAME:=emu2}" "${ZONE:=us-east5-a}" "${PROJECT:=$(gcloud config get-value project 2>/dev/null || echo my-project)}"
: "${REPO_URL:=https://github.com/OWNER/emu2_jax.git}" "${REPO_DIR:=emu2_jax}"
