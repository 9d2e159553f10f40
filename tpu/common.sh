# Shared by tpu/create_vm.sh, tpu/setup.sh and tpu/launch.sh (sourced, not run): error
# handling, --dry_run, the options all three take and the pieces of the scripts that
# setup.sh and launch.sh send to the workers. The sourcing script sets PROG first.

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

truthy() {
  case "${1:-}" in 1|true|True|TRUE|yes|on) return 0 ;; *) return 1 ;; esac
}

q() { printf '%q' "$1"; }

# Print a command (shell-quoted, one line, prefixed by '+ ') and run it unless --dry_run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if truthy "$DRY_RUN"; then
    return 0
  fi
  "$@"
}

# --flag VALUE: the value must be there
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

# The options every script takes, with their environment variables.
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()            # --gcloud_arg
NAME_FROM_ARGS=0

# Parse one of the shared options at "$@"; sets SHIFT to the number of arguments it used
# (0: not a shared option, the caller handles it). A bare word is the TPU VM name.
common_option() {
  SHIFT=1
  case "$1" in
    --name=*) NAME="${1#*=}"; NAME_FROM_ARGS=1 ;;
    --name) need_value "$@"; NAME="$2"; NAME_FROM_ARGS=1; SHIFT=2 ;;
    --zone=*) ZONE="${1#*=}" ;;
    --zone) need_value "$@"; ZONE="$2"; SHIFT=2 ;;
    --project=*) PROJECT="${1#*=}" ;;
    --project) need_value "$@"; PROJECT="$2"; SHIFT=2 ;;
    --gcloud_arg=*) EXTRA+=("${1#*=}") ;;
    --gcloud_arg) need_value "$@"; EXTRA+=("$2"); SHIFT=2 ;;
    --dry_run|--dry-run) DRY_RUN=1 ;;
    -*) SHIFT=0 ;;
    *)
      [[ "$NAME_FROM_ARGS" == 0 ]] || die "more than one NAME given ($NAME, $1)"
      NAME="$1"; NAME_FROM_ARGS=1 ;;
  esac
}

# After parsing: the name and zone are there; COMMON holds gcloud's --zone (and --project).
check_common() {
  [[ -n "$NAME" ]] || die "the TPU VM name is required: pass NAME (or --name=NAME, or set TPU_NAME)"
  [[ -n "$ZONE" ]] || die "the zone is required: pass --zone=ZONE (or set TPU_ZONE), e.g. --zone=us-west4-a"
  COMMON=(--zone="$ZONE")
  [[ -z "$PROJECT" ]] || COMMON+=(--project="$PROJECT")
}

# Once every input is checked: gcloud must be there, unless --dry_run.
require_gcloud() {
  if ! truthy "$DRY_RUN" && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk), or use --dry_run"
  fi
}

# ------------------------------------------------------------- the scripts sent to the workers
# A shell line for the workers: VAR=PATH, made absolute under the remote home (ssh commands
# start there; a leading ~/ is dropped).
remote_dir_line() {
  local var="$1" p="${2#\~/}"
  [[ -n "$p" && "$p" != "~" ]] || die "empty remote path for $var"
  printf '%s=%s; case "$%s" in /*) ;; *) %s="$HOME/$%s" ;; esac' "$var" "$(q "$p")" "$var" "$var" "$var"
}

# The lines of array STEPS, one script.
join_steps() {
  local s out=""
  for s in "${STEPS[@]}"; do
    out+="$s"$'\n'
  done
  printf '%s' "$out"
}
