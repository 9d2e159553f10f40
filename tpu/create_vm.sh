#!/usr/bin/env bash
# Create a Cloud TPU VM slice for cm3leon_jax (see tpu/README.md).
set -euo pipefail

PROG="tpu/create_vm.sh"

usage() {
  cat <<'EOF'
Usage: tpu/create_vm.sh [options] [NAME]

Create a Cloud TPU VM slice with gcloud:
  gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME ...
or, with --queued, a queued resource (recommended for large slices and Spot):
  gcloud compute tpus queued-resources create QUEUED_ID --node-id=NAME --zone=ZONE \
      --accelerator-type=TYPE --runtime-version=RUNTIME ...
Each command is printed before it runs.

Options (each has an environment variable; a flag wins over its variable):
  NAME, --name=NAME             TPU VM name (TPU_NAME)                               [required]
  --zone=ZONE                   zone, e.g. us-west4-a, us-central2-b (TPU_ZONE)      [required]
  --accelerator_type=TYPE       slice type (TPU_ACCELERATOR_TYPE; default v5litepod-256),
                                e.g. v5litepod-256, v4-128, v5p-128, v6e-256
  --runtime_version=VERSION     TPU software version (TPU_RUNTIME_VERSION; default from the type:
                                v5litepod/v5e -> v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5,
                                v6e -> v2-alpha-tpuv6e, v4 -> tpu-ubuntu2204-base)
  --project=PROJECT             Google Cloud project (TPU_PROJECT; default: gcloud's configured one)
  --spot                        Spot VMs: cheaper, may be preempted (TPU_SPOT=1)
  --preemptible                 preemptible TPUs (TPU_PREEMPTIBLE=1; tpu-vm create only, not --queued)
  --queued                      create a queued resource instead (TPU_QUEUED=1)
  --queued_id=ID                the queued resource's id (TPU_QUEUED_ID; default NAME-qr)
  --valid_until_duration=DUR    --queued: give up if not provisioned within DUR, e.g. 6h
                                (TPU_VALID_UNTIL_DURATION)
  --gcloud_arg=ARG              one more argument for the gcloud create command (repeatable),
                                e.g. --gcloud_arg=--network=my-net --gcloud_arg=--internal-ips
  --dry_run                     print the gcloud commands, run nothing (DRY_RUN=1)
  -h, --help                    this help

Examples:
  tpu/create_vm.sh --zone=us-west4-a --accelerator_type=v5litepod-256 --spot --queued cm3leon-7b
  TPU_ZONE=us-central2-b TPU_ACCELERATOR_TYPE=v4-128 tpu/create_vm.sh --dry_run cm3leon-v4

Next: tpu/setup.sh NAME --zone=ZONE ... installs the project on every worker.
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v5litepod-256}"
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
SPOT="${TPU_SPOT:-0}"
PREEMPTIBLE="${TPU_PREEMPTIBLE:-0}"
QUEUED="${TPU_QUEUED:-0}"
QUEUED_ID="${TPU_QUEUED_ID:-}"
VALID_UNTIL="${TPU_VALID_UNTIL_DURATION:-}"

while [[ $# -gt 0 ]]; do
  common_option "$@"
  if [[ "$SHIFT" -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --accelerator_type=*|--accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --accelerator_type|--accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; shift ;;
    --runtime_version=*|--runtime-version=*|--version=*) RUNTIME_VERSION="${1#*=}" ;;
    --runtime_version|--runtime-version|--version) need_value "$@"; RUNTIME_VERSION="$2"; shift ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --queued_id=*) QUEUED_ID="${1#*=}" ;;
    --queued_id) need_value "$@"; QUEUED_ID="$2"; shift ;;
    --valid_until_duration=*) VALID_UNTIL="${1#*=}" ;;
    --valid_until_duration) need_value "$@"; VALID_UNTIL="$2"; shift ;;
    *) die "unknown option $1" ;;
  esac
  shift
done

check_common
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "invalid TPU VM name '$NAME': lower-case letters, digits and '-', starting with a letter"
[[ "$ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "invalid accelerator type '$ACCELERATOR_TYPE' (expected e.g. v5litepod-256, v4-128, v5p-128)"

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default runtime version for accelerator type '$ACCELERATOR_TYPE': pass --runtime_version=VERSION" ;;
  esac
fi

if truthy "$SPOT" && truthy "$PREEMPTIBLE"; then
  die "--spot and --preemptible exclude each other: choose one"
fi
if truthy "$QUEUED" && truthy "$PREEMPTIBLE"; then
  die "queued resources take --spot, not --preemptible"
fi
if [[ -n "$VALID_UNTIL" ]] && ! truthy "$QUEUED"; then
  die "--valid_until_duration applies to --queued only"
fi

require_gcloud

if truthy "$QUEUED"; then
  QUEUED_ID="${QUEUED_ID:-$NAME-qr}"
  CMD=(gcloud compute tpus queued-resources create "$QUEUED_ID" --node-id="$NAME" "${COMMON[@]}"
       --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  truthy "$SPOT" && CMD+=(--spot)
  [[ -z "$VALID_UNTIL" ]] || CMD+=(--valid-until-duration="$VALID_UNTIL")
else
  CMD=(gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}"
       --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  truthy "$SPOT" && CMD+=(--spot)
  truthy "$PREEMPTIBLE" && CMD+=(--preemptible)
fi
CMD+=("${EXTRA[@]+"${EXTRA[@]}"}")

run "${CMD[@]}"

if truthy "$QUEUED"; then
  echo "# the request is queued; it is ready when its state is ACTIVE:"
  printf '#  '
  printf ' %q' gcloud compute tpus queued-resources describe "$QUEUED_ID" "${COMMON[@]}"
  printf '\n'
fi
echo "# next: tpu/setup.sh $NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT} --git_url=URL (or --local)"
