#!/usr/bin/env bash
# Run one command on every worker of a TPU VM slice at once, with a log per worker (see tpu/README.md).
set -euo pipefail

PROG="tpu/launch.sh"

usage() {
  cat <<'EOF'
Usage: tpu/launch.sh [options] NAME -- COMMAND [ARGS...]
       tpu/launch.sh [options] NAME -- 'SHELL COMMAND LINE'

Run COMMAND on every worker of TPU VM slice NAME at the same time
(gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...), in the code directory and
virtualenv that tpu/setup.sh made. Several arguments after -- run as they are (each quoted);
a single argument is a shell command line run on the workers (pipes, &&, globs, $VARS). A multi-host JAX program must start on all workers
together: `cm3leon train` / `cm3leon finetune` call jax.distributed.initialize() themselves,
which on a TPU slice finds the other workers from the TPU metadata; nothing needs setting.

Logs: each worker writes its output to REMOTE_LOG_DIR/RUN.worker<N>.log on itself; the
output that comes back (lines prefixed "[worker N] ") goes to LOG_DIR/RUN/all.log and is
split into LOG_DIR/RUN/worker-<N>.log here. The gcloud command is printed before it runs.

Options (environment variables in brackets; a flag wins):
  NAME, --name=NAME             TPU VM name (TPU_NAME)                              [required]
  --zone=ZONE                   its zone (TPU_ZONE)                                 [required]
  --project=PROJECT             Google Cloud project (TPU_PROJECT)
  --worker=W                    all (default), or one worker, e.g. 0 (TPU_WORKER)
  --remote_dir=DIR              the code on the workers (default cm3leon_jax, under the home)
  --venv=DIR                    the virtualenv on the workers (default cm3leon_venv); --venv=none
                                runs COMMAND without activating one
  --env=KEY=VALUE               set an environment variable for COMMAND (repeatable), e.g.
                                --env=CM3LEON_CORPUS_DATA=gs://B/task
  --run_name=RUN                names the logs (default: the date and time, YYYYmmdd-HHMMSS)
  --log_dir=DIR                 local log directory (default tpu_logs/NAME)
  --remote_log_dir=DIR          log directory on the workers (default cm3leon_logs)
  --detach                      start COMMAND under nohup on every worker and return at once
                                (follow it: tpu/launch.sh NAME -- 'tail -n 5 cm3leon_logs/RUN.worker*.log')
  --gcloud_arg=ARG              one more argument for gcloud (repeatable), e.g. --gcloud_arg=--internal-ip
  --dry_run                     print the gcloud command, run nothing (DRY_RUN=1)
  -h, --help                    this help

Examples:
  tpu/launch.sh cm3leon-7b --zone=us-west4-a -- cm3leon train --gin_file=gin/cm3leon_7b.gin \
      --model_dir=gs://BUCKET/cm3leon_7b --gin.corpus_data_dir.path="'gs://BUCKET/task'"
  tpu/launch.sh cm3leon-7b --zone=us-west4-a --worker=0 -- cm3leon info --gin_file=gin/cm3leon_7b.gin
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="${TPU_WORKER:-all}"
REMOTE_DIR="cm3leon_jax"
VENV="cm3leon_venv"
RUN_NAME=""
LOG_DIR=""
REMOTE_LOG_DIR="cm3leon_logs"
DETACH=0
ENVS=()
COMMAND=()

while [[ $# -gt 0 ]]; do
  [[ "$1" == -* || "$NAME_FROM_ARGS" == 0 ]] ||
    die "unexpected argument '$1': put the command to run after --"
  common_option "$@"
  if [[ "$SHIFT" -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; COMMAND=("$@"); break ;;
    --worker=*) WORKER="${1#*=}" ;;
    --worker) need_value "$@"; WORKER="$2"; shift ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --remote_dir) need_value "$@"; REMOTE_DIR="$2"; shift ;;
    --venv=*) VENV="${1#*=}" ;;
    --venv) need_value "$@"; VENV="$2"; shift ;;
    --env=*) ENVS+=("${1#*=}") ;;
    --env) need_value "$@"; ENVS+=("$2"); shift ;;
    --run_name=*) RUN_NAME="${1#*=}" ;;
    --run_name) need_value "$@"; RUN_NAME="$2"; shift ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --log_dir) need_value "$@"; LOG_DIR="$2"; shift ;;
    --remote_log_dir=*) REMOTE_LOG_DIR="${1#*=}" ;;
    --remote_log_dir) need_value "$@"; REMOTE_LOG_DIR="$2"; shift ;;
    --detach) DETACH=1 ;;
    *) die "unknown option $1 (put the command to run after --)" ;;
  esac
  shift
done

check_common
[[ ${#COMMAND[@]} -gt 0 ]] || die "no command given: put it after --, e.g. $PROG $NAME -- cm3leon info --gin_file=gin/cm3leon_7b.gin"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
done
RUN_NAME="${RUN_NAME:-$(date +%Y%m%d-%H%M%S)}"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "invalid --run_name '$RUN_NAME' (letters, digits, . _ -)"
LOG_DIR="${LOG_DIR:-tpu_logs/$NAME}"

SRC_LINE="$(remote_dir_line SRC "$REMOTE_DIR")"
LOGS_LINE="$(remote_dir_line LOGS "$REMOTE_LOG_DIR")"
[[ "$VENV" == "none" ]] || VENV_LINE="$(remote_dir_line VENV "$VENV")"
require_gcloud

# ---------------------------------------------------------------- what each worker runs
# several arguments: run as they are (each shell-quoted); one argument: a shell command line,
# so that pipes, &&, globs and $VARIABLES work on the workers
if [[ ${#COMMAND[@]} -eq 1 ]]; then
  CMD_STR="${COMMAND[0]}"
else
  CMD_STR=""
  for a in "${COMMAND[@]}"; do
    CMD_STR+="$(q "$a") "
  done
  CMD_STR="${CMD_STR% }"
fi

STEPS=("set -uo pipefail")
# the worker's number in the slice (TPU metadata), else its host name
STEPS+=("W=\$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname)")
STEPS+=("$SRC_LINE" "$LOGS_LINE")
STEPS+=("mkdir -p \"\$LOGS\" && cd \"\$SRC\" || exit 1")
if [[ "$VENV" != "none" ]]; then
  STEPS+=("$VENV_LINE")
  STEPS+=("[ -x \"\$VENV/bin/python\" ] || { echo \"[worker \$W] no virtualenv at \$VENV: run tpu/setup.sh first\"; exit 1; }")
  STEPS+=("export VIRTUAL_ENV=\"\$VENV\" PATH=\"\$VENV/bin:\$PATH\"")
fi
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
  STEPS+=("export $(q "${kv%%=*}")=$(q "${kv#*=}")")
done
STEPS+=("LOG=\"\$LOGS\"/$(q "$RUN_NAME").worker\$W.log")
STEPS+=("echo \"[worker \$W] \$(hostname): \$PWD\$ \"$(q "$CMD_STR") | tee -a \"\$LOG\"")
if [[ "$DETACH" == 1 ]]; then
  STEPS+=("nohup setsid bash -c $(q "$CMD_STR") >> \"\$LOG\" 2>&1 < /dev/null &")
  STEPS+=("echo \"[worker \$W] started (pid \$!), log: \$LOG\"")
else
  STEPS+=("{ $CMD_STR ; } 2>&1 < /dev/null | tee -a \"\$LOG\" | sed -u \"s/^/[worker \$W] /\"")
  STEPS+=("rc=\${PIPESTATUS[0]}; echo \"[worker \$W] exit status \$rc\"; exit \$rc")
fi
REMOTE_SCRIPT="$(join_steps)"

GCLOUD=(gcloud compute tpus tpu-vm ssh "$NAME" --worker="$WORKER" "${COMMON[@]}")
GCLOUD+=("${EXTRA[@]+"${EXTRA[@]}"}" --command="$REMOTE_SCRIPT")

printf '+'
printf ' %q' "${GCLOUD[@]}"
printf '\n'
if truthy "$DRY_RUN"; then
  exit 0
fi

# ---------------------------------------------------------------- run, keep the logs here too
RUN_DIR="$LOG_DIR/$RUN_NAME"
mkdir -p "$RUN_DIR"
ALL="$RUN_DIR/all.log"
split_logs() {
  awk -v dir="$RUN_DIR" '
    substr($0, 1, 8) == "[worker " {
      i = index($0, "] ")
      if (i > 9) { w = substr($0, 9, i - 9); print substr($0, i + 2) >> (dir "/worker-" w ".log"); next }
    }
    { print >> (dir "/gcloud.log") }' "$ALL"
}
trap split_logs EXIT
echo "# logs: $RUN_DIR (all.log, worker-<N>.log); on the workers: $REMOTE_LOG_DIR/$RUN_NAME.worker<N>.log"
set +e
"${GCLOUD[@]}" 2>&1 | tee -a "$ALL"
rc=${PIPESTATUS[0]}
set -e
if [[ "$rc" != 0 ]]; then
  echo "$PROG: the command failed on at least one worker (gcloud exit status $rc); see $RUN_DIR" >&2
fi
exit "$rc"
