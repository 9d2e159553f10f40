#!/usr/bin/env bash
# img2dataset webdataset shards (CC3M, LAION, ...: {00000..N}.tar, each
# sample a KEY.jpg + KEY.txt) -> the data dir of the retrieval-augmented CM3
# pretraining task corpus_cm3_retrieval: `cm3leon task-data` (prepare, CLIP
# memory bank, ScaNN index, neighbour table).
#   data/webdataset.sh --shards='/data/cc3m/{00000..00331}.tar' --out=/data/cc3m_task \
#       --vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe --clip_dir=/m/clip
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
USAGE="data/webdataset.sh --shards=GLOB $PRETRAIN_USAGE"
HELP="--shards: the tar shards: a directory of *.tar, a glob ('/data/*.tar') or
webdataset's brace notation ('/data/{00000..00331}.tar'); quote it.
$PRETRAIN_HELP"
# shellcheck disable=SC2086
parse_flags shards $PRETRAIN_FLAGS -- "$@"
SHARDS=$(need shards)
OUT=$(need out)
need vqgan_dir VQGAN_DIR >/dev/null
need text_tokenizer TEXT_TOKENIZER >/dev/null
need clip_dir CLIP_DIR >/dev/null
need_cm3leon
OUT=$(absdir "$OUT" make)

task_data "webdataset:$SHARDS" "$OUT"
print_train_command "$OUT"
