# Shared by the recipes in data/ (sourced, not run): flags, the usage
# message, echoing each step, and the layout checks. The recipes run only
# the project's own `cm3leon` commands, which must be on PATH (the repo's
# virtualenv: `. .venv/bin/activate`, or PATH=/path/to/repo/.venv/bin:$PATH).

# usage [MESSAGE]: the recipe's usage ($USAGE, $HELP) and exit 2.
usage() {
  printf 'usage: %s\n' "$USAGE" >&2
  if [ -n "${1:-}" ]; then printf 'error: %s\n' "$1" >&2; fi
  exit 2
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# parse_flags NAME... -- ARG...: each `--name=value` sets FLAG_name; a bare
# `--name` sets FLAG_name=1; anything else, or a name not listed, is a usage
# error. -h / --help prints the usage and $HELP.
parse_flags() {
  local allowed=" " arg name value
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do allowed+="$1 "; shift; done
  [ "$#" -gt 0 ] && shift
  for arg in "$@"; do
    case "$arg" in
      -h|--help) printf 'usage: %s\n\n%s\n' "$USAGE" "${HELP:-}"; exit 0 ;;
      --*=*) name=${arg%%=*}; name=${name#--}; value=${arg#*=} ;;
      --*) name=${arg#--}; value=1 ;;
      *) usage "unexpected argument '$arg' (flags are --name=value)" ;;
    esac
    case "$allowed" in
      *" $name "*) printf -v "FLAG_$name" '%s' "$value" ;;
      *) usage "unknown flag --$name" ;;
    esac
  done
}

# flag NAME [ENV_VAR] [DEFAULT]: the value of --NAME, else $ENV_VAR, else DEFAULT.
flag() {
  local v="FLAG_$1"
  v=${!v:-}
  if [ -z "$v" ] && [ -n "${2:-}" ]; then v=${!2:-}; fi
  printf '%s' "${v:-${3:-}}"
}

# need NAME [ENV_VAR]: like flag, but a missing value is a usage error.
need() {
  local v
  v=$(flag "$1" "${2:-}")
  if [ -z "$v" ]; then usage "missing --$1${2:+ (or \$$2)}"; fi
  printf '%s' "$v"
}

need_file() { [ -f "$1" ] || die "$2: $1 not found"; }
need_dir() { [ -d "$1" ] || die "$2: $1 is not a directory"; }

# An absolute path without resolving symbolic links (made if asked).
absdir() {
  if [ "${2:-}" = make ]; then mkdir -p "$1"; fi
  (cd "$1" && pwd)
}
abspath() { printf '%s/%s' "$(absdir "$(dirname "$1")")" "$(basename "$1")"; }

# run CMD ARG...: print the command (shell-quoted) and run it.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  "$@"
}

# gin_str_flag NAME PATH: `--gin.NAME='PATH'` (a gin string), quoted for a shell.
gin_str_flag() {
  case "$2" in
    *[\'\"\\\$\`]*) printf '%q' "--gin.$1='$2'" ;;
    *) printf '"--gin.%s='"'"'%s'"'"'"' "$1" "$2" ;;
  esac
}

need_cm3leon() {
  command -v cm3leon >/dev/null 2>&1 ||
    die "cm3leon is not on PATH: activate the repository's virtualenv (. .venv/bin/activate) or put its bin/ first on PATH"
}

# ---------------------------------------------------------------- pretraining recipes
PRETRAIN_FLAGS="out vqgan_dir text_tokenizer clip_dir k max_text_tokens records_per_shard gin_file model_dir no_progress"
PRETRAIN_USAGE="--out=DIR --vqgan_dir=DIR --text_tokenizer=DIR --clip_dir=DIR [--k=16] [--max_text_tokens=N] [--records_per_shard=N] [--gin_file=gin/cm3leon_350m.gin] [--model_dir=DIR] [--no_progress]"
PRETRAIN_HELP="Models (flag, or environment variable):
  --vqgan_dir       \$VQGAN_DIR       the image tokenizer (\`cm3leon convert vqgan\` or \`cm3leon tokenizer train-image\`)
  --text_tokenizer  \$TEXT_TOKENIZER  the BPE dir with tokenizer.json (\`cm3leon tokenizer train-text\`)
  --clip_dir        \$CLIP_DIR        the CLIP model dir (\`cm3leon convert clip\`)
Optional: --k (neighbours per document, default 16), --max_text_tokens,
--records_per_shard (passed to \`cm3leon task-data\`); --gin_file and --model_dir
only fill in the train command printed at the end."

# task_data SOURCE_SPEC OUT: `cm3leon task-data` with the recipe's model flags.
task_data() {
  local args=(task-data "--source=$1" "--out=$2" "--vqgan_dir=$(need vqgan_dir VQGAN_DIR)"
              "--text_tokenizer=$(need text_tokenizer TEXT_TOKENIZER)" "--clip_dir=$(need clip_dir CLIP_DIR)"
              "--k=$(flag k '' 16)")
  local v
  v=$(flag max_text_tokens); if [ -n "$v" ]; then args+=("--max_text_tokens=$v"); fi
  v=$(flag records_per_shard); if [ -n "$v" ]; then args+=("--records_per_shard=$v"); fi
  if [ -n "$(flag no_progress)" ]; then args+=(--no_progress); fi
  run cm3leon "${args[@]}"
}

# print_train_command DATA_DIR: how to train on a `cm3leon task-data` dir.
print_train_command() {
  echo
  echo "== $1 holds prepared/, bank/ (with neighbours/) and index/."
  echo "== Train on it: the registered task corpus_cm3_retrieval (or corpus_cm3, without"
  echo "== retrieval) reads corpus_data_dir.path (or \$CM3LEON_CORPUS_DATA); the gin file's"
  echo "== vocabulary must match the VQ-GAN codebook and the BPE size:"
  echo "cm3leon train --gin_file=$(flag gin_file '' gin/cm3leon_350m.gin) $(gin_str_flag corpus_data_dir.path "$1") --model_dir=$(flag model_dir '' MODEL_DIR)"
}

# ---------------------------------------------------------------- SFT recipes
SFT_FLAGS="out vqgan_dir text_tokenizer max_inputs_length max_targets_length init_checkpoint gin_file model_dir no_progress"
SFT_USAGE="--out=DIR --vqgan_dir=DIR --text_tokenizer=DIR [--max_inputs_length=2048] [--max_targets_length=2048] [--init_checkpoint=DIR] [--gin_file=gin/sft_7b.gin] [--model_dir=DIR] [--no_progress]"
SFT_HELP="Models (flag, or environment variable), those of the pretrained model you fine-tune:
  --vqgan_dir       \$VQGAN_DIR       the image tokenizer
  --text_tokenizer  \$TEXT_TOKENIZER  the BPE dir (tokenizer.json)
Optional: --max_inputs_length / --max_targets_length (tokens; longer records are
skipped, default 2048 each, gin/sft_7b.gin's TASK_FEATURE_LENGTHS: an image is
1,024 codes at 256 px); --init_checkpoint, --gin_file and --model_dir only fill
in the finetune command printed at the end."

# sft_prepare RECORDS OUT: `cm3leon sft prepare` (train split) with the recipe's flags.
sft_prepare() {
  local args=(sft prepare "--records=$1" "--out=$2" --split=train "--vqgan_dir=$(need vqgan_dir VQGAN_DIR)"
              "--text_tokenizer=$(need text_tokenizer TEXT_TOKENIZER)"
              "--max_inputs_length=$(flag max_inputs_length '' 2048)"
              "--max_targets_length=$(flag max_targets_length '' 2048)")
  if [ -n "$(flag no_progress)" ]; then args+=(--no_progress); fi
  run cm3leon "${args[@]}"
}

# print_finetune_command SFT_DIR FAMILY...: how to fine-tune on a prepared SFT
# dir, one command per family's task corpus_sft_FAMILY.
print_finetune_command() {
  local dir=$1 family
  shift
  echo
  echo "== $dir is a prepared SFT dataset (families: $*)."
  echo "== Fine-tune on it: the registered task corpus_sft_FAMILY reads corpus_sft_data_dir.path"
  echo "== (or \$CM3LEON_SFT_DATA). (corpus_sft_mixture, gin/sft_7b.gin's default, needs every"
  echo "== SFT family in the dir today: an absent family fails its shuffle.)"
  for family in "$@"; do
    echo "cm3leon finetune --gin_file=$(flag gin_file '' gin/sft_7b.gin) --init_checkpoint=$(flag init_checkpoint '' PRETRAINED_MODEL_DIR) $(gin_str_flag corpus_sft_data_dir.path "$dir") \"--gin.MIXTURE_OR_TASK_NAME='corpus_sft_$family'\" --model_dir=$(flag model_dir '' SFT_MODEL_DIR)"
  done
}
