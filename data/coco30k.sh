#!/usr/bin/env bash
# The paper's zero-shot MS-COCO 30K FID (CM3Leon Table 1) of a trained model:
# `cm3leon eval coco` on a local COCO 2014 (nothing is downloaded): 30,000
# val2014 images drawn with a seed, one caption each, one image generated per
# caption (best of 8 by CLIP), FID on InceptionV3 pool3 features.
# Layout read: COCO_DIR/annotations/captions_val2014.json and COCO_DIR/val2014/*.jpg.
#   data/coco30k.sh --coco_dir=/data/coco --model_dir=/m/cm3leon_350m --out=/tmp/coco30k \
#       --inception_weights=/m/pt_inception-2015-12-05-6726825d.pth
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
USAGE="data/coco30k.sh --coco_dir=DIR --model_dir=DIR --out=DIR (--inception_weights=FILE | --features=clip --clip_dir=DIR) [--num_images=30000] [--split=val2014] [--num_samples=8] [--no_progress]"
HELP="--model_dir: a \`cm3leon train\` model dir (retrieval reads its training data dir).
--inception_weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the
  reported FID); or --features=clip with --clip_dir (\$CLIP_DIR) for a quick,
  non-standard FID.
The output dir holds real/, fake/, captions.jsonl and fid.json; a rerun with the
same flags continues."
parse_flags coco_dir model_dir out inception_weights features clip_dir num_images split num_samples no_progress -- "$@"
COCO=$(need coco_dir)
MODEL=$(need model_dir)
OUT=$(need out)
SPLIT=$(flag split '' val2014)
FEATURES=$(flag features '' inception)
args=(eval coco "--model_dir=$MODEL" "--out=$OUT" "--split=$SPLIT" "--num_images=$(flag num_images '' 30000)"
      "--features=$FEATURES" "--num_samples=$(flag num_samples '' 8)")
case "$FEATURES" in
  inception) args+=("--inception_weights=$(need inception_weights)") ;;
  clip) args+=("--clip_dir=$(need clip_dir CLIP_DIR)") ;;
  *) usage "--features is inception or clip, not '$FEATURES'" ;;
esac
if [ -n "$(flag no_progress)" ]; then args+=(--no_progress); fi
need_cm3leon
need_dir "$COCO" "--coco_dir"
need_file "$COCO/annotations/captions_$SPLIT.json" "COCO captions (the 30K protocol uses COCO 2014's val2014)"
need_dir "$COCO/$SPLIT" "COCO $SPLIT images"
need_dir "$MODEL" "--model_dir"
run cm3leon "${args[@]}" "--coco_dir=$COCO"
