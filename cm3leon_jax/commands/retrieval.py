"""`cm3leon embed` and `cm3leon index {build,search,neighbours}`: the CLIP
memory bank and its ScaNN index (retrieval/embed.py, retrieval/bank.py,
retrieval/index.py, retrieval/neighbours.py) from the command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

from cm3leon_jax.commands.helpers import input_error, run_resumable
from cm3leon_jax.retrieval import index as index_lib


def add_embed(sub):
    p = sub.add_parser(
        "embed", help="embed every document of a source with CLIP: the retrieval memory bank",
        description="Embed every document of a source with a CLIP model dir (batched, jitted). A "
                    "document's key is the mean of its L2-normalised text and image embeddings "
                    "(paper Sec. 2.1). Writes embeddings.npy, ids.npy, modalities.npy, "
                    "captions.jsonl and bank.json; an interrupted run continues where it stopped "
                    "when rerun with the same flags.",
        epilog="Example: cm3leon embed --clip_dir=/tmp/clip --source=shapes:2000 --out=/tmp/bank\n"
               "Sources: shapes:N[:SEED], image_folder:PATH (images + captions.jsonl).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip_dir", required=True, help="CLIP model dir (`cm3leon convert clip` output)")
    p.add_argument("--source", required=True, help="document source spec, e.g. shapes:2000")
    p.add_argument("--out", required=True, help="output bank directory")
    p.add_argument("--batch_size", type=int, default=64, help="documents per jitted encode call")
    p.add_argument("--modality", choices=("both", "text", "image"), default="both",
                   help="which embeddings make the key (both: the mean of those present)")
    p.add_argument("--chunk_size", type=int, default=1024,
                   help="documents per resumable chunk file (keep it when resuming)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side the source decodes to (default: the source's own)")
    p.add_argument("--text_tokenizer", default=None,
                   help="the project's BPE dir, for a CLIP dir without tokenizer files")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)


def add_index(sub):
    p = sub.add_parser("index", help="build, query and use the MIPS index over a memory bank",
                       description="The retrieval index (ScaNN or exact) over a bank from `cm3leon embed`.")
    isub = p.add_subparsers(dest="index_command", metavar="WHAT")
    b = isub.add_parser(
        "build", help="index a bank's keys (ScaNN for large banks, exact below 20,000)",
        description="Build a MipsIndex over BANK_DIR's embeddings; parameters are chosen from the "
                    "bank size unless given, and printed as JSON.",
        epilog="Example: cm3leon index build --embeddings=/tmp/bank --out=/tmp/index")
    b.add_argument("--embeddings", required=True, help="bank directory (`cm3leon embed` output)")
    b.add_argument("--out", required=True, help="output index directory")
    b.add_argument("--kind", choices=("auto", "scann", "brute_force"), default="auto")
    for name, typ in (("num_leaves", int), ("num_leaves_to_search", int), ("training_sample_size", int),
                      ("ah_training_sample_size", int), ("dims_per_block", int),
                      ("anisotropic_quantization_threshold", float), ("reorder", int)):
        b.add_argument(f"--{name}", type=typ, default=None, help="ScaNN parameter (default: automatic)")
    b.add_argument("--k", type=int, default=None, help="neighbours the ScaNN parameters are tuned for (10)")
    b.set_defaults(func=cmd_index_build)
    s = isub.add_parser(
        "search", help="embed a text query with the index's CLIP and print the top documents",
        description="Embed --query with the CLIP the index manifest names (or --clip_dir, which "
                    "must be the same model) and print rank, id, score and caption.",
        epilog='Example: cm3leon index search --index=/tmp/index --query="a red circle" --k=5')
    s.add_argument("--index", required=True, help="index directory")
    s.add_argument("--query", required=True, help="query text")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--clip_dir", default=None, help="CLIP model dir (default: the one the index names)")
    s.add_argument("--embeddings", default=None,
                   help="bank directory for captions (default: the bank the index was built from)")
    s.add_argument("--text_tokenizer", default=None,
                   help="the project's BPE dir, for a CLIP dir without tokenizer files")
    s.set_defaults(func=cmd_index_search)
    nb = isub.add_parser(
        "neighbours", help="top-K candidates of every bank document (itself excluded), for training",
        description="Search every document of the bank with the index and store its top-K other "
                    "documents in BANK_DIR/neighbours/, read by the data pipeline.",
        epilog="Example: cm3leon index neighbours --embeddings=/tmp/bank --index=/tmp/index --k=32")
    nb.add_argument("--embeddings", required=True, help="bank directory")
    nb.add_argument("--index", required=True, help="index directory built from that bank")
    nb.add_argument("--k", type=int, default=32, help="candidates per document")
    nb.add_argument("--no_progress", action="store_true", help="no progress bar")
    nb.set_defaults(func=cmd_index_neighbours)


def cmd_embed(args, gin_bindings: List[str]) -> int:
    del gin_bindings

    def job():
        from cm3leon_jax.data import sources
        from cm3leon_jax.retrieval import embed

        source = sources.open_source(args.source, resolution=args.resolution)
        result = None
        if getattr(source, "kind", None) == "prepared":  # same CLIP: the stored embeddings, no model run
            from cm3leon_jax.data import prepared

            result = prepared.bank_from_prepared(source, args.clip_dir, args.out, modality=args.modality,
                                                 text_tokenizer=args.text_tokenizer)
        if result is None:
            result = embed.embed_source(source, args.clip_dir, args.out, batch_size=args.batch_size,
                                        modality=args.modality, chunk_size=args.chunk_size,
                                        text_tokenizer=args.text_tokenizer, progress=not args.no_progress)
        return {k: result.get(k) for k in ("count", "dim", "embedding_model", "source", "modality",
                                           "skipped", "resumed_chunks")} | {"out": args.out}

    return run_resumable(job, "chunks")


def cmd_index_build(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    import os

    try:
        from cm3leon_jax.retrieval.bank import load_bank
        from cm3leon_jax.retrieval.index import MipsIndex

        bank = load_bank(args.embeddings)
        overrides = {k: getattr(args, k) for k in (
            "num_leaves", "num_leaves_to_search", "training_sample_size", "ah_training_sample_size",
            "dims_per_block", "anisotropic_quantization_threshold", "reorder", "k")
            if getattr(args, k) is not None}
        if args.kind != "auto":
            overrides["kind"] = args.kind
        try:
            index = MipsIndex.build(bank.embeddings, bank.ids, embedding_model=bank.embedding_model,
                                    **overrides)
        except ValueError as e:
            raise ValueError(f"bank {args.embeddings!r}: {e}") from e
        index.save(args.out)
        with open(os.path.join(args.out, index_lib.INDEX_BANK_REF), "w") as f:
            json.dump({"bank_dir": os.path.abspath(args.embeddings)}, f)
    except (ValueError, OSError) as e:
        return input_error(e)
    print(json.dumps({"out": args.out, "count": index.size, "dim": index.dim,
                      "embedding_model": index.embedding_model, **index.params}), flush=True)
    return 0


def cmd_index_search(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    import os

    try:
        from cm3leon_jax.retrieval.bank import load_bank
        from cm3leon_jax.retrieval.clip_encoder import ClipEncoder, parse_identity, same_model
        from cm3leon_jax.retrieval.index import MipsIndex

        index = MipsIndex.load(args.index)
        named_dir, fingerprint = parse_identity(index.embedding_model)
        if fingerprint is None:
            raise ValueError(f"index {args.index!r} was built with embedding model {index.embedding_model!r}, "
                             "not with a CLIP model dir this command can embed queries with: rebuild it from "
                             "a bank made by `cm3leon embed`")
        clip_dir = args.clip_dir or named_dir
        if not os.path.isdir(clip_dir):
            raise ValueError(f"the CLIP model dir index {args.index!r} names ({clip_dir!r}) does not exist: "
                             "pass --clip_dir=<a copy of that model>")
        encoder = ClipEncoder(clip_dir, batch_size=1, text_tokenizer=args.text_tokenizer)
        if not same_model(encoder.identity, index.embedding_model):
            raise ValueError(f"index {args.index!r} was built with embedding model {index.embedding_model!r} "
                             f"but --clip_dir {clip_dir!r} is another model ({encoder.identity!r}): query with "
                             "the CLIP the index was built with, or rebuild the index")
        query_key = encoder.encode_texts([args.query])[0]  # a text-only document's key
        try:
            ids, scores = index.search(query_key, args.k)
        except ValueError as e:
            raise ValueError(f"index {args.index!r}: {e}") from e
        bank_dir, bank, note = args.embeddings, None, None
        if bank_dir is None and os.path.isfile(os.path.join(args.index, index_lib.INDEX_BANK_REF)):
            with open(os.path.join(args.index, index_lib.INDEX_BANK_REF)) as f:
                bank_dir = json.load(f).get("bank_dir")
        try:
            bank = load_bank(bank_dir) if bank_dir else None
        except (ValueError, OSError) as e:
            note = f"captions unavailable ({' '.join(str(e).split())})"
        if bank is None and note is None:
            note = "captions unavailable: pass --embeddings=BANK_DIR"
    except (ValueError, OSError) as e:
        return input_error(e)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    rows = bank.rows(ids) if bank is not None else None
    print("rank\tid\tscore\tcaption")
    for r, (doc_id, score) in enumerate(zip(ids.tolist(), scores.tolist())):
        if doc_id < 0:
            continue
        caption = bank.caption(int(rows[r])) if rows is not None and rows[r] >= 0 else None
        print(f"{r + 1}\t{doc_id}\t{score:.4f}\t{'' if caption is None else caption}")
    sys.stdout.flush()
    return 0


def cmd_index_neighbours(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    try:
        from cm3leon_jax.retrieval import neighbours

        manifest = neighbours.build_neighbour_table(args.embeddings, args.index, k=args.k,
                                                    progress=not args.no_progress)
    except (ValueError, OSError) as e:
        return input_error(e)
    print(json.dumps(manifest), flush=True)
    return 0
