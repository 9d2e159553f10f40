#!/usr/bin/env bash
# Install cm3leon_jax with the `tpu` extra on every worker of a TPU VM slice (see tpu/README.md).
set -euo pipefail

PROG="tpu/setup.sh"

usage() {
  cat <<'EOF'
Usage: tpu/setup.sh [options] NAME (--git_url=URL [--branch=BRANCH] | --tarball=FILE | --local)

Install the project with the `tpu` extra on every worker of TPU VM slice NAME, at once
(gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...): a Python virtualenv
(made with uv, which fetches the Python version asked for: jax 0.10.2 needs >= 3.11, newer
than the TPU images' python3), the code, then `pip install -e '.[tpu]'` and a check that
jax imports and sees the worker's TPU chips. Rerunning updates the code and reinstalls.
Each gcloud command is printed before it runs.

Where the code comes from (one of):
  --git_url=URL [--branch=B]    git clone (or fetch + checkout) on each worker (TPU_GIT_URL,
                                TPU_GIT_BRANCH; default branch main)
  --tarball=FILE                a .tar.gz of the repository (root files at its top level),
                                copied to every worker with `gcloud compute tpus tpu-vm scp`
  --local                       pack this checkout (tracked + untracked, not ignored, files)
                                into a tarball and copy that

Options (environment variables in brackets; a flag wins):
  NAME, --name=NAME             TPU VM name (TPU_NAME)                              [required]
  --zone=ZONE                   its zone (TPU_ZONE)                                 [required]
  --project=PROJECT             Google Cloud project (TPU_PROJECT)
  --worker=W                    workers to set up: all (default), or e.g. 0 (TPU_WORKER)
  --remote_dir=DIR              where the code goes on the workers (default cm3leon_jax,
                                relative to the remote home)
  --venv=DIR                    the virtualenv on the workers (default cm3leon_venv)
  --python=VERSION              Python of the virtualenv (default 3.11)
  --extras=LIST                 pip extras (default tpu); e.g. tpu,test
  --no_check                    skip the jax import / device check
  --gcloud_arg=ARG              one more argument for every gcloud command (repeatable),
                                e.g. --gcloud_arg=--internal-ip
  --dry_run                     print the gcloud commands, run nothing (DRY_RUN=1)
  -h, --help                    this help

Examples:
  tpu/setup.sh cm3leon-7b --zone=us-west4-a --git_url=https://github.com/ORG/cm3leon_jax --branch=main
  tpu/setup.sh cm3leon-7b --zone=us-west4-a --local

Next: tpu/launch.sh NAME --zone=ZONE -- cm3leon train --gin_file=gin/cm3leon_7b.gin --model_dir=gs://B/run
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="${TPU_WORKER:-all}"
GIT_URL="${TPU_GIT_URL:-}"
BRANCH="${TPU_GIT_BRANCH:-main}"
TARBALL=""
LOCAL=0
REMOTE_DIR="cm3leon_jax"
VENV="cm3leon_venv"
PYTHON_VERSION="3.11"
EXTRAS="tpu"
CHECK=1

while [[ $# -gt 0 ]]; do
  common_option "$@"
  if [[ "$SHIFT" -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --worker=*) WORKER="${1#*=}" ;;
    --worker) need_value "$@"; WORKER="$2"; shift ;;
    --git_url=*) GIT_URL="${1#*=}" ;;
    --git_url) need_value "$@"; GIT_URL="$2"; shift ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --branch) need_value "$@"; BRANCH="$2"; shift ;;
    --tarball=*) TARBALL="${1#*=}" ;;
    --tarball) need_value "$@"; TARBALL="$2"; shift ;;
    --local) LOCAL=1 ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --remote_dir) need_value "$@"; REMOTE_DIR="$2"; shift ;;
    --venv=*) VENV="${1#*=}" ;;
    --venv) need_value "$@"; VENV="$2"; shift ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --python) need_value "$@"; PYTHON_VERSION="$2"; shift ;;
    --extras=*) EXTRAS="${1#*=}" ;;
    --extras) need_value "$@"; EXTRAS="$2"; shift ;;
    --no_check) CHECK=0 ;;
    *) die "unknown option $1" ;;
  esac
  shift
done

check_common
sources=0
[[ -z "$GIT_URL" ]] || sources=$((sources + 1))
[[ -z "$TARBALL" ]] || sources=$((sources + 1))
[[ "$LOCAL" == 0 ]] || sources=$((sources + 1))
[[ "$sources" -gt 0 ]] || die "say where the code comes from: --git_url=URL, --tarball=FILE or --local"
[[ "$sources" -eq 1 ]] || die "give only one of --git_url, --tarball and --local"
[[ "$EXTRAS" =~ ^[A-Za-z0-9_,-]+$ ]] || die "invalid --extras '$EXTRAS'"
[[ "$PYTHON_VERSION" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] || die "invalid --python '$PYTHON_VERSION' (e.g. 3.11)"
SRC_LINE="$(remote_dir_line SRC "$REMOTE_DIR")"
VENV_LINE="$(remote_dir_line VENV "$VENV")"
require_gcloud

COMMON+=("${EXTRA[@]+"${EXTRA[@]}"}")

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_TARBALL="cm3leon_jax_src.tar.gz"
CLEANUP=""
trap '[[ -z "$CLEANUP" ]] || rm -rf "$CLEANUP"' EXIT

if [[ "$LOCAL" == 1 ]]; then
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "--local packs a git checkout, and $REPO_ROOT is none: use --tarball=FILE or --git_url=URL"
  CLEANUP="$(mktemp -d "${TMPDIR:-/tmp}/cm3leon_jax_src.XXXXXX")"
  TARBALL="$CLEANUP/cm3leon_jax_src.tar.gz"
  echo "# packing $REPO_ROOT (git ls-files: tracked + untracked, not ignored) into $TARBALL"
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
     xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh |
     tar --null -czf "$TARBALL" --files-from=-)
elif [[ -n "$TARBALL" ]]; then
  [[ -f "$TARBALL" ]] || die "--tarball $TARBALL is not a file"
fi

# The script every worker runs (values shell-quoted; relative paths are under the remote home).
STEPS=("set -euo pipefail")
STEPS+=("echo \"[\$(hostname)] cm3leon_jax setup\"")
STEPS+=("export PATH=\"\$HOME/.local/bin:\$PATH\"")
STEPS+=("$SRC_LINE" "$VENV_LINE")
STEPS+=("command -v uv >/dev/null 2>&1 || python3 -m pip install --user --quiet --upgrade uv || (curl -LsSf https://astral.sh/uv/install.sh | sh)")
STEPS+=("[ -x \"\$VENV/bin/python\" ] || uv venv --python $(q "$PYTHON_VERSION") \"\$VENV\"")
if [[ -n "$GIT_URL" ]]; then
  STEPS+=("if [ -d \"\$SRC/.git\" ]; then git -C \"\$SRC\" fetch --quiet origin $(q "$BRANCH") && git -C \"\$SRC\" checkout --quiet -B $(q "$BRANCH") FETCH_HEAD; else git clone --quiet --branch $(q "$BRANCH") $(q "$GIT_URL") \"\$SRC\"; fi")
else
  STEPS+=("rm -rf \"\$SRC\" && mkdir -p \"\$SRC\" && tar -xzf \"\$HOME\"/$(q "$REMOTE_TARBALL") -C \"\$SRC\" && rm -f \"\$HOME\"/$(q "$REMOTE_TARBALL")")
fi
STEPS+=("cd \"\$SRC\"")
STEPS+=("uv pip install --python \"\$VENV/bin/python\" -e $(q ".[$EXTRAS]")")
if [[ "$CHECK" == 1 ]]; then
  STEPS+=("\"\$VENV/bin/python\" -c 'import jax, cm3leon_jax; d = jax.local_devices(); print(\"jax\", jax.__version__, len(d), \"local\", d[0].platform, \"devices\")'")
fi
REMOTE_SCRIPT="$(join_steps)"

if [[ -n "$TARBALL" ]]; then
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$REMOTE_TARBALL" --worker="$WORKER" "${COMMON[@]}"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" --worker="$WORKER" "${COMMON[@]}" --command="$REMOTE_SCRIPT"
echo "# next: tpu/launch.sh $NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT} -- cm3leon info --gin_file=gin/cm3leon_7b.gin"
