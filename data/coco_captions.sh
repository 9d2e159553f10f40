#!/usr/bin/env bash
# COCO captions -> a task that trains, either
#   --mode=pretrain (default): the data dir of the retrieval-augmented CM3
#       task corpus_cm3_retrieval (`cm3leon task-data` on the image-caption
#       pairs), or
#   --mode=sft: the captioning family of a prepared SFT dataset
#       (`cm3leon sft convert coco_captions` + `cm3leon sft prepare`).
# Layout read (COCO 2014 or 2017, unzipped): COCO_DIR/annotations/captions_SPLIT.json
# and COCO_DIR/SPLIT/*.jpg.
#   data/coco_captions.sh --coco_dir=/data/coco --split=train2014 --out=/data/coco_task \
#       --vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe --clip_dir=/m/clip
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
USAGE="data/coco_captions.sh --coco_dir=DIR [--split=train2017] [--mode=pretrain|sft] [--all_captions] $PRETRAIN_USAGE
       (--mode=sft: --clip_dir is not needed; [--max_inputs_length=2048] [--max_targets_length=2048] [--init_checkpoint=DIR])"
HELP="--coco_dir: holds annotations/captions_SPLIT.json and SPLIT/ (the images).
--split: train2017 (default), train2014, val2014, ...
--mode=pretrain: one document per image (its first caption), or one per
  caption with --all_captions (five views of each image, which retrieval then
  finds as each other's neighbours).
--mode=sft: one captioning record per caption.
Zero-shot COCO FID (data/coco30k.sh) draws from val2014: train2017 holds about
35,000 of its images, so pretrain on train2014 (or not on COCO) to keep it
zero-shot.
$PRETRAIN_HELP"
# shellcheck disable=SC2086
parse_flags coco_dir split mode all_captions max_inputs_length max_targets_length init_checkpoint \
  $PRETRAIN_FLAGS -- "$@"
COCO=$(need coco_dir)
SPLIT=$(flag split '' train2017)
MODE=$(flag mode '' pretrain)
OUT=$(need out)
case "$MODE" in
  pretrain) need clip_dir CLIP_DIR >/dev/null ;;
  sft) ;;
  *) usage "--mode is pretrain or sft, not '$MODE'" ;;
esac
need vqgan_dir VQGAN_DIR >/dev/null
need text_tokenizer TEXT_TOKENIZER >/dev/null
need_cm3leon
need_dir "$COCO" "--coco_dir"
COCO=$(absdir "$COCO")
ANNOTATIONS="$COCO/annotations/captions_$SPLIT.json"
need_file "$ANNOTATIONS" "COCO captions for --split=$SPLIT"
need_dir "$COCO/$SPLIT" "COCO images for --split=$SPLIT"
OUT=$(absdir "$OUT" make)

if [ "$MODE" = sft ]; then
  run cm3leon sft convert coco_captions "--annotations=$ANNOTATIONS" "--images=$COCO/$SPLIT" \
    "--out=$OUT/records_captioning.jsonl"
  sft_prepare "$OUT/records_captioning.jsonl" "$OUT"
  print_finetune_command "$OUT" captioning
  exit 0
fi

# `cm3leon prepare` reads image-caption pairs as an image folder (images +
# captions.jsonl); there is no COCO source spec, so the pairs are written as
# one: OUT/source/images links to the COCO image dir (nothing is copied), and
# the captioning records of `cm3leon sft convert` (image checks included)
# become OUT/source/captions.jsonl.
SOURCE="$OUT/source"
mkdir -p "$SOURCE"
run ln -sfn "$COCO/$SPLIT" "$SOURCE/images"
run cm3leon sft convert coco_captions "--annotations=$ANNOTATIONS" "--images=$SOURCE/images" \
  "--out=$SOURCE/records.jsonl"
PYTHON=$(dirname "$(command -v cm3leon)")/python
[ -x "$PYTHON" ] || PYTHON=python3
ALL=$([ -n "$(flag all_captions)" ] && echo all || echo first)
echo "+ $SOURCE/records.jsonl -> $SOURCE/captions.jsonl ($ALL caption(s) per image)"
"$PYTHON" - "$SOURCE/records.jsonl" "$SOURCE/captions.jsonl" "$ALL" <<'PY'
import json, os, sys

records, captions, which = sys.argv[1:]
seen, n = set(), 0
with open(records, encoding="utf-8") as f, open(captions + ".tmp", "w", encoding="utf-8") as out:
    for line in f:
        rec = json.loads(line)
        image = rec["meta"]["image_id"]
        if which == "first" and image in seen:
            continue
        seen.add(image)
        out.write(json.dumps({"file": rec["input_image"], "caption": rec["output_text"], "image_id": image}) + "\n")
        n += 1
os.replace(captions + ".tmp", captions)
print(json.dumps({"documents": n, "images": len(seen)}))
PY
task_data "image_folder:$SOURCE" "$OUT"
print_train_command "$OUT"
echo
echo "== Zero-shot MS-COCO 30K FID of the trained model: data/coco30k.sh --coco_dir=COCO_2014_DIR --model_dir=MODEL_DIR --out=DIR --inception_weights=pt_inception-2015-12-05-6726825d.pth"
case "$SPLIT" in
  train2017|val2014|val2017) echo "== (warning: $SPLIT shares images with val2014, from which the 30K are drawn; that FID is not zero-shot)" ;;
esac
