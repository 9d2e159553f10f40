"""`cm3leon generate`: text -> image (PNGs, a grid, samples.json) and image
-> text (captioning, VQA) with a trained model dir.

What a model dir's generation needs is found from its `config.gin`: the
decoder and vocabulary (gin), the latest checkpoint's parameters, and, from
the training task's prepared dataset manifest, the VQ-GAN (codes -> PNG), the
BPE (text <-> ids) and the CLIP (retrieval and reranking); the memory bank
and index sit beside the prepared data (`cm3leon task-data` layout). Flags
override each of them.

Prompt layouts (DESIGN.md, "Sequence layout"; the training documents are
`text <break> image` or `image <break> text`):

- text -> image: `[retrieved_1 <eos> retrieved_2 <eos>] text <break>`, then
  exactly the VQ-GAN's code count of image codes, then `<eos>`.
  Classifier-free guidance's unconditional stream is the same prompt with
  the query text replaced by one `<mask:0>` (PAPER.md). Assumption: the
  retrieved documents stay in the unconditional stream (they are context,
  not the text being guided towards), and retrieved documents are laid out
  text first.
- image -> text: `image <break> [prompt text]`, then text ids (never an image
  code) until `<eos>`.

Retrieval at inference embeds the prompt with the CLIP the bank was built
with, searches the index, and applies the strategy's inference choice
(relevance, modality, the 0.9 cut; no query dropout).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Optional, Sequence

import numpy as np

from cm3leon_jax import paths as paths_lib
from cm3leon_jax import vocab as vocab_lib


@dataclasses.dataclass
class ModelBundle:
    model_dir: str
    cfg: object              # DecoderConfig
    vocab: vocab_lib.UnifiedVocabulary
    params: dict
    step: int
    vqgan_dir: Optional[str]
    text_tokenizer: Optional[str]
    clip_dir: Optional[str]
    bank_dir: Optional[str]
    index_dir: Optional[str]
    prepared_dir: Optional[str]
    sft: bool = False        # fine-tuned on SFT tasks: prompts in the sft/format.py layout


def checkpoint_steps(model_dir: str) -> List[int]:
    """The steps of a model dir's saved checkpoints, oldest first."""
    from cm3leon_jax import checkpoints as ckpt_lib

    directory = ckpt_lib.checkpoint_dir(model_dir)
    return sorted(int(p) for p in paths_lib.listdir(directory) if p.isdigit()) \
        if paths_lib.isdir(directory) else []


def _latest_params(model_dir: str, step: Optional[int] = None):
    """(step, params) of the latest readable checkpoint, or of `step`."""
    import orbax.checkpoint as ocp

    from cm3leon_jax import checkpoints as ckpt_lib

    directory = ckpt_lib.checkpoint_dir(model_dir)
    steps = checkpoint_steps(model_dir)[::-1]
    if not steps:
        raise ValueError(f"model dir {model_dir!r} has no checkpoint under {directory!r}: train it first "
                         "(`cm3leon train --model_dir=...`)")
    if step is not None:
        if step not in steps:
            raise ValueError(f"model dir {model_dir!r} has no checkpoint of step {step} (it has {sorted(steps)})")
        steps = [step]
    errors = []
    for step in steps:
        try:
            state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
            return step, state["params"]
        except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: try the one before
            errors.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
    raise ValueError(f"no readable checkpoint in {directory!r} ({'; '.join(errors)})")


def load_model(model_dir: str, vqgan_dir: Optional[str] = None, text_tokenizer: Optional[str] = None,
               clip_dir: Optional[str] = None, data_dir: Optional[str] = None,
               step: Optional[int] = None) -> ModelBundle:
    """Everything generation needs from a trained model dir (see the module
    docstring), with the latest checkpoint's parameters or those of `step`;
    ValueError naming what is missing and the flag that gives it."""
    import gin

    from cm3leon_jax import gin_utils
    from cm3leon_jax.data import tasks as tasks_lib
    from cm3leon_jax.models.decoder_config import DecoderConfig

    config = os.path.join(model_dir, "config.gin")
    if not paths_lib.isfile(config):
        raise ValueError(f"{model_dir!r} has no config.gin: not a `cm3leon train` model dir")
    from cm3leon_jax.data.pipeline import TRAIN_DATA_MODULES

    gin_utils.parse([config], [], extra_modules=TRAIN_DATA_MODULES, check_required=False)
    cfg = DecoderConfig()
    vocab = vocab_lib.UnifiedVocabulary()
    step, params = _latest_params(model_dir, step)
    prepared_dir = bank_dir = None
    if data_dir:
        prepared_dir = os.path.join(data_dir, tasks_lib.PREPARED_SUBDIR)
        bank_dir = os.path.join(data_dir, tasks_lib.BANK_SUBDIR)
    else:
        try:
            task = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
        except ValueError:
            task = None
        paths = tasks_lib.task_paths(task) if task else None
        if paths:
            prepared_dir, bank_dir = paths
    models, sft = {}, False
    if prepared_dir and paths_lib.isfile(os.path.join(prepared_dir, "prepared.json")):
        with paths_lib.open(os.path.join(prepared_dir, "prepared.json")) as f:
            models = json.load(f).get("models", {})
    elif task:
        from cm3leon_jax.data import pipeline

        try:
            sft = pipeline.is_prefix_lm(task)
        except ValueError:
            sft = False
        if sft:
            models = pipeline.prefix_lm_data_models(task)
    index_dir = None
    if bank_dir:
        index_dir = os.path.join(os.path.dirname(bank_dir), tasks_lib.INDEX_SUBDIR)
        if not paths_lib.isdir(index_dir):
            index_dir = None
    return ModelBundle(model_dir=paths_lib.abspath(model_dir), cfg=cfg, vocab=vocab, params=params, step=step,
                       vqgan_dir=vqgan_dir or models.get("vqgan_dir"),
                       text_tokenizer=text_tokenizer or models.get("text_tokenizer"),
                       clip_dir=clip_dir or models.get("clip_dir"), bank_dir=bank_dir, index_dir=index_dir,
                       prepared_dir=prepared_dir, sft=sft)


# Candidates searched for the strategy to choose from. The diversity rule
# skips a candidate scoring above 0.9 against the query; in a small or
# repetitive corpus (the demo's shapes grammar: a held-out caption has a
# median of ~30 documents above 0.9) the first few dozen can all be skipped.
RETRIEVAL_CANDIDATES = 256


def _need(value, what: str, flag: str):
    if not value or not paths_lib.exists(value):
        raise ValueError(f"generation needs the {what} ({value!r} not found): pass {flag}")
    return value


class Generator:
    """Text -> image and image -> text with one loaded model."""

    def __init__(self, bundle: ModelBundle, quantize: Optional[str] = None):
        import jax.numpy as jnp

        from cm3leon_jax.data.tokenizers import TextTokenizer
        from cm3leon_jax.models.image_tokenizer import ImageTokenizer

        import jax

        self.b = bundle
        params = jax.tree.map(jnp.asarray, bundle.params)
        if quantize == "int8":
            from cm3leon_jax.models.quantize import quantize_params

            params = quantize_params(params, bundle.cfg)
        elif quantize not in (None, "none"):
            raise ValueError(f"--quantize must be int8 or none, got {quantize!r}")
        self.params = params
        self.text = TextTokenizer(_need(bundle.text_tokenizer, "text tokenizer (BPE dir)", "--text_tokenizer"),
                                  bundle.vocab)
        self.vq = ImageTokenizer.from_model_dir(_need(bundle.vqgan_dir, "VQ-GAN model dir", "--vqgan_dir"))
        if self.vq.codebook_size != bundle.vocab.image_codebook_size:
            raise ValueError(f"VQ-GAN {bundle.vqgan_dir!r} has {self.vq.codebook_size} codes but the model's "
                             f"vocabulary has {bundle.vocab.image_codebook_size}: pass the --vqgan_dir it was "
                             "trained with")
        self._clip = None
        self._retriever = None

    # -- helpers ---------------------------------------------------------------------
    @property
    def clip(self):
        if self._clip is None:
            from cm3leon_jax.retrieval.clip_encoder import ClipEncoder

            self._clip = ClipEncoder(_need(self.b.clip_dir, "CLIP model dir", "--clip_dir"), batch_size=8)
        return self._clip

    def retrieve(self, prompt: str, k: int) -> List[dict]:
        """The strategy's `k` documents for a text prompt (inference: no
        dropout), from the task's memory bank and index."""
        if k <= 0:
            return []
        from cm3leon_jax.data.prepared import PreparedDataset
        from cm3leon_jax.retrieval import strategy
        from cm3leon_jax.retrieval.bank import load_bank
        from cm3leon_jax.retrieval.index import MipsIndex

        if self._retriever is None:
            index_dir = _need(self.b.index_dir, "retrieval index", "--data_dir (a `cm3leon task-data` dir)")
            bank = load_bank(_need(self.b.bank_dir, "memory bank", "--data_dir"))
            self._retriever = (MipsIndex.load(index_dir), bank, PreparedDataset(self.b.prepared_dir))
        index, bank, store = self._retriever
        key = self.clip.encode_texts([prompt])[0]
        ids, scores = index.search(key, min(max(4 * k, RETRIEVAL_CANDIDATES), index.size))
        rows = bank.rows(ids)
        cands = [strategy.Candidate(int(i), float(s), bool(bank.modalities[r, 0]), bool(bank.modalities[r, 1]),
                                    f"{int(bank.content_hashes[r]):016x}" if bank.content_hashes is not None else None)
                 for i, s, r in zip(ids.tolist(), scores.tolist(), rows.tolist()) if i >= 0 and r >= 0]
        chosen = strategy.select(cands, k)
        return [dict(store.by_id(c.doc_id), score=c.score) for c in chosen]

    def image_prompt(self, prompt: str, retrieved: Sequence[dict]):
        """(conditional, unconditional) token lists for text -> image."""
        from cm3leon_jax.data import retrieval_aug

        ctx = retrieval_aug.layout([retrieval_aug.document_tokens(d, retrieval_aug.TEXT_FIRST) for d in retrieved])
        text = self.text.encode(prompt)
        if not text.size:
            raise ValueError("empty prompt: give the text to generate an image for")
        brk = [vocab_lib.BREAK_ID]
        cond = list(ctx) + text.tolist() + brk
        uncond = list(ctx) + [self.b.vocab.mask_id(0)] + brk
        return cond, uncond

    def images(self, prompt: str, num_samples: int, settings, seed: int, num_retrieved: int = 0):
        """Samples for one prompt: (uint8 images [N, H, W, 3], codes [N, C],
        retrieved documents)."""
        (imgs, codes, retrieved), = self.images_for_prompts([prompt], num_samples, settings, seed, num_retrieved)
        return imgs, codes, retrieved

    def images_for_prompts(self, prompts: Sequence[str], num_samples: int, settings, seed: int,
                           num_retrieved: int = 0, batch_rows: int = 32):
        """Samples for many prompts, batched `batch_rows` rows (prompt x
        sample) per sampler call: [(images, codes, retrieved)] per prompt.
        Prompt i's samples draw from seed + i (see `images_for_requests`)."""
        items = [(p, seed + i, num_samples) for i, p in enumerate(prompts)]
        results = self.images_for_requests(items, settings, num_retrieved, batch_rows=batch_rows)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def check_length(self, tokens: Sequence[int], what: str = "the prompt") -> None:
        """ValueError when a prompt and the image it asks for do not fit the
        model's context (the position table would be read past its end)."""
        total = len(tokens) + 1 + self.vq.codes_per_image + 1  # BOS, the codes, <eos>
        if total > self.b.cfg.max_length:
            raise ValueError(f"{what} is {len(tokens)} tokens; with the {self.vq.codes_per_image} image codes "
                             f"it needs {total} positions but the model has {self.b.cfg.max_length}: shorten "
                             "it or retrieve fewer documents")

    def images_for_requests(self, items: Sequence[tuple], settings, num_retrieved: int = 0, batch_rows: int = 32,
                            width: Optional[int] = None, length_bucket: int = 1):
        """Samples for requests `(prompt, seed, num_samples)` that share the
        sampler's settings: [(images, codes, retrieved)] per request, or the
        ValueError of a request whose prompt cannot be sampled (the others
        are sampled all the same).

        Sample j of a request draws from its own key, fold_in(PRNGKey(seed),
        j), so the result does not depend on how rows are batched or on the
        other requests; for `mixed` sample 1 of each prompt uses CD-K. `width` pads
        every sampler call to that many rows and `length_bucket` rounds the
        prompt length up to a multiple of it (a server compiles the sampler
        once per shape, not once per request)."""
        import jax
        import jax.numpy as jnp

        from cm3leon_jax.sampling import sampler

        if not items or batch_rows < 1 or any(n < 1 for _, _, n in items):
            raise ValueError(f"every request needs num_samples >= 1 and batch_rows >= 1, got "
                             f"{[n for _, _, n in items]}, {batch_rows}")
        prepared, results = {}, [None] * len(items)
        for i, (prompt, _, _) in enumerate(items):
            try:
                retrieved = self.retrieve(prompt, num_retrieved)
                cond, uncond = self.image_prompt(prompt, retrieved)
                self.check_length(cond)
                prepared[i] = (cond, uncond, retrieved)
            except ValueError as e:
                results[i] = e
        if not prepared:
            return results
        n_codes = self.vq.codes_per_image
        guided = settings.decoding in ("cd_k", "mixed") or settings.cfg_scale != 1.0
        length = max(max(len(c), len(u)) for c, u, _ in prepared.values())  # one prompt length: one compile
        length = min(-(-length // length_bucket) * length_bucket, self.b.cfg.max_length - n_codes - 2)
        rows = [(i, j) for i in sorted(prepared) for j in range(items[i][2])]
        width = width or min(batch_rows, len(rows))
        codes = np.zeros((len(rows), n_codes), np.int32)
        for start in range(0, len(rows), width):
            chunk = rows[start:start + width]
            chunk = chunk + [chunk[-1]] * (width - len(chunk))  # pad to the compiled batch; dropped below
            ct, cs = sampler.left_pad([prepared[i][0] for i, _ in chunk], length=length)
            keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(items[i][1]), j) for i, j in chunk])
            kw = dict(cd_rows=np.array([sampler.mixed_sample_decoding(j) == "cd_k" for _, j in chunk]))
            if guided:
                ut, us = sampler.left_pad([prepared[i][1] for i, _ in chunk], length=length)
                kw.update(uncond_prompts=jnp.asarray(ut), uncond_starts=jnp.asarray(us))
            out, _ = sampler.generate(self.params, jnp.asarray(ct), jnp.asarray(cs), keys, cfg=self.b.cfg,
                                      max_new_tokens=n_codes + 1, settings=settings,
                                      constraint=sampler.Constraint("image", image_tokens=n_codes),
                                      vocab=self.b.vocab, **kw)
            real = min(width, len(rows) - start)
            codes[start:start + real] = self.b.vocab.id_to_image_code(np.asarray(out)[:real, :n_codes])
        imgs = self.vq.decode(codes)
        start = 0
        for i in sorted(prepared):
            n = items[i][2]
            results[i] = (imgs[start:start + n], codes[start:start + n], prepared[i][2])
            start += n
        return results

    def image_ids(self, image: np.ndarray) -> np.ndarray:
        """Unified ids of an image's VQ-GAN codes."""
        codes = self.vq.encode(image[None])[0].reshape(-1)
        return self.b.vocab.image_code_to_id(codes.astype(np.int64)).astype(np.int32)

    def text_from_image(self, image: np.ndarray, prompt: str, settings, seed: int, max_tokens: int = 64) -> str:
        import jax
        import jax.numpy as jnp

        from cm3leon_jax.sampling import sampler

        ids = self.image_ids(image).tolist()
        if self.b.sft:  # a fine-tuned model: instruction <break> image <break> (sft/format.py)
            from cm3leon_jax.sampling import prompt_formats

            if not prompt:
                raise ValueError("a fine-tuned model needs the instruction: pass --prompt")
            toks = prompt_formats.layout("sft")(self.text.encode(prompt), ids, [])[0].tolist()
        else:
            toks = ids + [vocab_lib.BREAK_ID] + (self.text.encode(prompt).tolist() if prompt else [])
        ct, cs = sampler.left_pad([toks])
        out, n = sampler.generate(self.params, jnp.asarray(ct), jnp.asarray(cs), jax.random.PRNGKey(seed),
                                  cfg=self.b.cfg, max_new_tokens=max_tokens, settings=settings,
                                  constraint=sampler.Constraint("text"), vocab=self.b.vocab)
        return self.text.decode(np.asarray(out[0, :int(n[0])]), skip_non_text=True)


def _grid(rows: List[np.ndarray], pad: int = 2) -> np.ndarray:
    """Images [rows][cols, H, W, 3] -> one uint8 grid with white gutters."""
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = img
    return out


def checkpoint_identity(model_dir: str, step: int) -> dict:
    """What names the parameters a sample dir was drawn with: the step, the
    checkpoint's resolved path (a model dir reached through a link names
    the real one) and, on a local disk, when it was written (a model
    retrained into the same dir is another checkpoint)."""
    from cm3leon_jax import checkpoints as ckpt_lib

    path = os.path.join(ckpt_lib.checkpoint_dir(model_dir), str(int(step)))
    if paths_lib.is_url(path):
        return {"step": int(step), "path": path, "written_ns": None}
    path = os.path.realpath(path)
    written = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    return {"step": int(step), "path": path, "written_ns": written}


def write_samples(g: Generator, prompts: Sequence[str], out_dir: str, settings, *, num_samples: int, seed: int,
                  num_retrieved: int = 0, keep: Optional[int] = None, batch_rows: int = 32) -> List[dict]:
    """PNGs (prompt index, rank by CLIP score), grid.png and samples.json;
    returns the samples.json rows. Prompt i's samples use seed + i, and
    `batch_rows` rows (prompt x sample) share a sampler call."""
    from PIL import Image

    from cm3leon_jax.sampling import rerank, sampler

    os.makedirs(out_dir, exist_ok=True)
    report, grid_rows = [], []
    have_clip = bool(g.b.clip_dir and os.path.isdir(g.b.clip_dir))
    results = g.images_for_prompts(prompts, num_samples, settings, seed, num_retrieved, batch_rows=batch_rows)
    for i, (prompt, (imgs, codes, retrieved)) in enumerate(zip(prompts, results)):
        if have_clip:
            order, scores = rerank.rerank(g.clip, prompt, imgs, keep)
        else:
            order, scores = np.arange(len(imgs))[:keep], np.full(len(imgs), np.nan)
        samples = []
        for rank, j in enumerate(order):
            name = f"{i:03d}_{rank}.png"
            Image.fromarray(imgs[j]).save(os.path.join(out_dir, name), optimize=False)
            samples.append({"file": name, "sample": int(j), "rank": rank,
                            "clip_score": None if np.isnan(scores[j]) else float(scores[j]),
                            "decoding": sampler.mixed_sample_decoding(j) if settings.decoding == "mixed"
                            else settings.decoding})
        grid_rows.append(imgs[order])
        report.append({"prompt": prompt, "seed": seed + i, "settings": dataclasses.asdict(settings),
                       "num_retrieved": num_retrieved,
                       "retrieved": [{"id": int(d["id"]), "caption": d.get("caption"), "score": d["score"]}
                                     for d in retrieved],
                       "samples": samples})
    Image.fromarray(_grid(grid_rows)).save(os.path.join(out_dir, "grid.png"), optimize=False)
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
        json.dump({"model_dir": g.b.model_dir, "step": g.b.step,
                   "checkpoint": checkpoint_identity(g.b.model_dir, g.b.step), "prompts": report}, f, indent=1)
    return report
