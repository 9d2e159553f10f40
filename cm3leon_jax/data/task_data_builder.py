"""Building the data dir of a CM3 task (`cm3leon task-data`): the prepared
dataset (`prepared/`), its memory bank (`bank/`), the MIPS index (`index/`)
and the neighbour table (`bank/neighbours/`), the layout data/tasks.py reads.
"""
from __future__ import annotations

import os

from cm3leon_jax.data.tasks import BANK_SUBDIR, INDEX_SUBDIR, PREPARED_SUBDIR


def build_task_data(source: str, data_dir: str, vqgan_dir: str, text_tokenizer: str, clip_dir: str, *,
                    k: int = 16, max_text_tokens: int = 128, records_per_shard: int = 1000,
                    progress: bool = True) -> dict:
    """The data of a retrieval task in `data_dir`, with the real commands'
    code: `cm3leon prepare` (prepared/), `cm3leon embed --source=prepared:`
    (bank/, from the stored CLIP embeddings), `cm3leon index build` (index/)
    and `cm3leon index neighbours` (bank/neighbours/). Each stage is skipped
    when its output is complete, so an interrupted build continues."""
    import json

    from cm3leon_jax.data import prepare, prepared
    from cm3leon_jax.retrieval import neighbours
    from cm3leon_jax.retrieval.bank import BANK_FILE, load_bank
    from cm3leon_jax.retrieval.index import INDEX_BANK_REF, MipsIndex

    prepared_dir = os.path.join(data_dir, PREPARED_SUBDIR)
    bank_dir = os.path.join(data_dir, BANK_SUBDIR)
    index_dir = os.path.join(data_dir, INDEX_SUBDIR)
    report = {"prepare": prepare.prepare(source, prepared_dir, vqgan_dir, text_tokenizer, clip_dir,
                                         max_text_tokens=max_text_tokens, records_per_shard=records_per_shard,
                                         progress=progress)}
    ds = prepared.PreparedDataset(prepared_dir)
    if not os.path.isfile(os.path.join(bank_dir, BANK_FILE)) or report["prepare"]["new_records"]:
        bank = prepared.bank_from_prepared(ds, clip_dir, bank_dir, text_tokenizer=text_tokenizer)
        if bank is None:
            raise ValueError(f"{clip_dir!r} is not the CLIP {prepared_dir!r} was prepared with")
        report["bank"] = {"count": bank["count"]}
    bank = load_bank(bank_dir)
    if not os.path.isdir(index_dir) or report.get("bank"):
        index = MipsIndex.build(bank.embeddings, bank.ids, embedding_model=bank.embedding_model)
        index.save(index_dir)
        with open(os.path.join(index_dir, INDEX_BANK_REF), "w") as f:
            json.dump({"bank_dir": os.path.abspath(bank_dir)}, f)
        report["index"] = {"count": index.size, **index.params}
    table = os.path.join(bank_dir, neighbours.TABLE_DIR, neighbours.MANIFEST_FILE)
    if not os.path.isfile(table) or report.get("index"):
        report["neighbours"] = neighbours.build_neighbour_table(bank_dir, index_dir, k=k, progress=progress)
    report["data_dir"] = os.path.abspath(data_dir)
    return report
