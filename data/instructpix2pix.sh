#!/usr/bin/env bash
# InstructPix2Pix -> the editing family of a prepared SFT dataset (`cm3leon sft
# convert instructpix2pix` + `cm3leon sft prepare`), which corpus_sft_mixture /
# corpus_sft_editing fine-tune on.
# Layout read (the released clip-filtered-dataset, unpacked):
#   IP2P_DIR/seeds.json                     [[PROMPT_DIR, [SEED, ...]], ...]
#   IP2P_DIR/PROMPT_DIR/prompt.json         {"input": ..., "edit": ..., "output": ...}
#   IP2P_DIR/PROMPT_DIR/SEED_0.jpg          the input image
#   IP2P_DIR/PROMPT_DIR/SEED_1.jpg          the edited image
#   data/instructpix2pix.sh --ip2p_dir=/data/clip-filtered-dataset --out=/data/sft_ip2p \
#       --vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
USAGE="data/instructpix2pix.sh --ip2p_dir=DIR $SFT_USAGE"
HELP="--ip2p_dir: the dataset dir holding seeds.json and the prompt dirs.
An editing record holds two images (input and output): at 256 px that is 1,024
codes on each side of the sequence.
$SFT_HELP"
# shellcheck disable=SC2086
parse_flags ip2p_dir $SFT_FLAGS -- "$@"
IP2P=$(need ip2p_dir)
OUT=$(need out)
need vqgan_dir VQGAN_DIR >/dev/null
need text_tokenizer TEXT_TOKENIZER >/dev/null
need_cm3leon
need_file "$IP2P/seeds.json" "InstructPix2Pix seeds file"
OUT=$(absdir "$OUT" make)

run cm3leon sft convert instructpix2pix "--src=$IP2P" "--out=$OUT/records_editing.jsonl"
sft_prepare "$OUT/records_editing.jsonl" "$OUT"
print_finetune_command "$OUT" editing
