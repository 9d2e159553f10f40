#!/usr/bin/env bash
# COCO instances (boxes) -> the detection family (image -> boxes as text) and
# the spatially grounded generation family (boxes as text -> image) of a
# prepared SFT dataset (`cm3leon sft convert coco_detection` + `cm3leon sft
# prepare`), which corpus_sft_mixture / corpus_sft_detection / corpus_sft_spatial
# fine-tune on.
# Layout read (COCO 2014 or 2017, unzipped): COCO_DIR/annotations/instances_SPLIT.json
# and COCO_DIR/SPLIT/*.jpg.
#   data/coco_detection.sh --coco_dir=/data/coco --split=train2017 --out=/data/sft_det \
#       --vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
USAGE="data/coco_detection.sh --coco_dir=DIR [--split=train2017] [--tasks=detection,spatial] $SFT_USAGE"
HELP="--coco_dir: holds annotations/instances_SPLIT.json and SPLIT/ (the images).
--tasks: which families to write (default both).
Boxes are mapped into the centre-cropped square image the model sees; crowd
boxes and boxes cut off by the crop are left out (counted in the convert report).
$SFT_HELP"
# shellcheck disable=SC2086
parse_flags coco_dir split tasks $SFT_FLAGS -- "$@"
COCO=$(need coco_dir)
OUT=$(need out)
SPLIT=$(flag split '' train2017)
TASKS=$(flag tasks '' detection,spatial)
need vqgan_dir VQGAN_DIR >/dev/null
need text_tokenizer TEXT_TOKENIZER >/dev/null
need_cm3leon
ANNOTATIONS="$COCO/annotations/instances_$SPLIT.json"
need_file "$ANNOTATIONS" "COCO instances for --split=$SPLIT"
need_dir "$COCO/$SPLIT" "COCO images for --split=$SPLIT"
OUT=$(absdir "$OUT" make)

run cm3leon sft convert coco_detection "--annotations=$ANNOTATIONS" "--images=$COCO/$SPLIT" "--tasks=$TASKS" \
  "--out=$OUT/records_detection.jsonl"
sft_prepare "$OUT/records_detection.jsonl" "$OUT"
print_finetune_command "$OUT" ${TASKS//,/ }
