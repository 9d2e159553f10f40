#!/usr/bin/env bash
# VQA v2 -> the vqa family of a prepared SFT dataset (`cm3leon sft convert vqa`
# + `cm3leon sft prepare`), which corpus_sft_mixture / corpus_sft_vqa fine-tune on.
# Layout read (the VQA v2 release and COCO 2014, unzipped):
#   VQA_DIR/v2_OpenEnded_mscoco_SPLIT_questions.json
#   VQA_DIR/v2_mscoco_SPLIT_annotations.json
#   COCO_DIR/SPLIT/COCO_SPLIT_<image_id:012d>.jpg
#   data/vqa.sh --vqa_dir=/data/vqa --coco_dir=/data/coco --out=/data/sft_vqa \
#       --vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
USAGE="data/vqa.sh --vqa_dir=DIR --coco_dir=DIR [--split=train2014] $SFT_USAGE"
HELP="--vqa_dir: holds v2_OpenEnded_mscoco_SPLIT_questions.json and v2_mscoco_SPLIT_annotations.json.
--coco_dir: holds SPLIT/ with COCO 2014's file names (COCO_train2014_000000000009.jpg;
  the questions name images by COCO 2014 id, so COCO 2017's renamed files do not match).
--split: train2014 (default) or val2014.
$SFT_HELP"
# shellcheck disable=SC2086
parse_flags vqa_dir coco_dir split $SFT_FLAGS -- "$@"
VQA=$(need vqa_dir)
COCO=$(need coco_dir)
OUT=$(need out)
SPLIT=$(flag split '' train2014)
need vqgan_dir VQGAN_DIR >/dev/null
need text_tokenizer TEXT_TOKENIZER >/dev/null
need_cm3leon
QUESTIONS="$VQA/v2_OpenEnded_mscoco_${SPLIT}_questions.json"
ANNOTATIONS="$VQA/v2_mscoco_${SPLIT}_annotations.json"
need_file "$QUESTIONS" "VQA v2 questions"
need_file "$ANNOTATIONS" "VQA v2 annotations"
need_dir "$COCO/$SPLIT" "COCO $SPLIT images"
OUT=$(absdir "$OUT" make)

run cm3leon sft convert vqa "--questions=$QUESTIONS" "--annotations=$ANNOTATIONS" "--images=$COCO/$SPLIT" \
  "--out=$OUT/records_vqa.jsonl"
sft_prepare "$OUT/records_vqa.jsonl" "$OUT"
print_finetune_command "$OUT" vqa
