"""Caption scores for image -> text (`cm3leon eval captions`): CIDEr and
BLEU-1..4 from pycocoevalcap, the scorers the COCO caption benchmark reports
(not re-implemented here).

Tokenisation: COCO's PTB tokenizer (Stanford CoreNLP, shipped inside
pycocoevalcap) when `java` is on PATH; otherwise a built-in one that does
what it does to plain English captions (lower-case, split off punctuation,
drop it), with a warning that scores may differ slightly from COCO's.

Input of the CLI: a JSON-lines file, one object per image:
`{"id": ..., "prediction": "...", "references": ["...", ...]}`.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from typing import Dict, Hashable, List, Sequence, Tuple

# PTB tokenizer punctuation that COCO's evaluation removes
_PUNCT = re.compile(r"""[\"'`.,:;!?()\[\]{}\-_/\\@#$%^&*+=<>|~]""")


def simple_tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _tokenize(gts: Dict[Hashable, List[str]], res: Dict[Hashable, List[str]], tokenizer: str
              ) -> Tuple[dict, dict, str]:
    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") else "simple"
        if tokenizer == "simple":
            logging.warning("java not found: captions are tokenised by the built-in tokenizer, not COCO's PTB "
                            "tokenizer; scores may differ slightly from published COCO numbers")
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        wrap = lambda d: {k: [{"caption": c} for c in v] for k, v in d.items()}  # noqa: E731
        return tok.tokenize(wrap(gts)), tok.tokenize(wrap(res)), "ptb"
    if tokenizer == "simple":
        return ({k: [simple_tokenize(c) for c in v] for k, v in gts.items()},
                {k: [simple_tokenize(c) for c in v] for k, v in res.items()}, "simple")
    raise ValueError(f"tokenizer must be auto, ptb or simple, got {tokenizer!r}")


def score_captions(references: Dict[Hashable, Sequence[str]], predictions: Dict[Hashable, str],
                   tokenizer: str = "auto") -> dict:
    """CIDEr and BLEU-1..4 of `predictions` (one per image id) against
    `references` (one or more per id). ValueError names a missing or extra
    id and an image without references; an empty prediction scores 0."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        raise ValueError(f"prediction and reference ids differ: {len(missing)} prediction(s) without references "
                         f"(e.g. {missing[:3]}), {len(extra)} reference(s) without a prediction (e.g. {extra[:3]})")
    empty_refs = [k for k, v in references.items() if not [c for c in v if c and c.strip()]]
    if empty_refs:
        raise ValueError(f"{len(empty_refs)} image(s) have no non-empty reference caption, e.g. {empty_refs[:3]}")
    gts = {k: [c for c in references[k] if c and c.strip()] for k in predictions}
    res = {k: [predictions[k] or ""] for k in predictions}
    gts, res, used = _tokenize(gts, res, tokenizer)
    # BLEU's scorer needs a token in every hypothesis: an empty prediction gets a placeholder that
    # matches no reference n-gram, so it scores 0 as it should
    res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"cider": float(cider), "bleu_4": float(bleu[3]), "bleu": [float(b) for b in bleu],
            "num_images": len(res), "tokenizer": used}


def read_predictions(path: str) -> Tuple[Dict[Hashable, List[str]], Dict[Hashable, str]]:
    """(references, predictions) from a JSON-lines file (module docstring)."""
    refs, preds = {}, {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read predictions file {path!r}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, pred, rs = row["id"], row["prediction"], row["references"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with id, prediction, references "
                                 f"({type(e).__name__}: {e})") from None
            if isinstance(rs, str):
                rs = [rs]
            key = json.dumps(key) if isinstance(key, (list, dict)) else key
            if key in preds:
                raise ValueError(f"{path}:{n}: id {key!r} appears twice")
            preds[key], refs[key] = str(pred), [str(r) for r in rs]
    return refs, preds
