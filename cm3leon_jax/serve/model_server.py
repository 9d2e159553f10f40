"""One loaded model answering requests: text -> image through the batcher
(requests that arrive together share a sampler call, each with its own
PRNG keys, so batching changes no sample), image -> text and editing one at
a time on the same worker. The page and the HTTP API both call this."""
from __future__ import annotations

import dataclasses
import os
import shlex
import threading
import time
from typing import List, Optional

import numpy as np

from cm3leon_jax.serve import requests as req_lib
from cm3leon_jax.serve.batcher import Batcher

# Prompt lengths are rounded up to a multiple of this many tokens, so the
# sampler compiles once per bucket rather than once per prompt length.
LENGTH_BUCKET = 64


@dataclasses.dataclass
class ServeConfig:
    model_dir: str
    vqgan_dir: Optional[str] = None
    text_tokenizer: Optional[str] = None
    clip_dir: Optional[str] = None
    data_dir: Optional[str] = None
    max_batch_rows: int = 32     # rows (request x sample) per sampler call
    max_queue: int = 16          # waiting requests before HTTP 503
    batch_window_s: float = 0.05  # how long the first request of a batch waits for companions
    quantize: str = "none"


class ModelServer:
    def __init__(self, config: ServeConfig, log=print):
        from cm3leon_jax.sampling import generate as gen_lib

        t = time.time()
        self.config, self.log = config, log
        bundle = gen_lib.load_model(config.model_dir, config.vqgan_dir, config.text_tokenizer, config.clip_dir,
                                    config.data_dir)
        self.g = gen_lib.Generator(bundle, quantize=config.quantize)
        self.has_clip = bool(bundle.clip_dir and os.path.isdir(bundle.clip_dir))
        self.max_retrieved = req_lib.MAX_RETRIEVED if bundle.index_dir and bundle.bank_dir else 0
        self.batcher = Batcher(self._run_batch, max_rows=config.max_batch_rows, max_queue=config.max_queue,
                               rows_of=self._rows_of, window_s=config.batch_window_s)
        self._lock = threading.Lock()  # describe / edit: one at a time, beside the batcher's thread
        log(f"loaded {bundle.model_dir} (step {bundle.step}) in {time.time() - t:.1f}s")

    # -- facts the page shows ------------------------------------------------------
    @property
    def is_sft(self) -> bool:
        return bool(self.g.b.sft)

    def example_prompts(self, n: int = 8) -> List[str]:
        """Held-out captions of the model's training task (its validation
        split, the last documents of the prepared data), when it has them."""
        from cm3leon_jax.data.prepared import PreparedDataset

        path = self.g.b.prepared_dir
        if not path or not os.path.isfile(os.path.join(path, "prepared.json")):
            return []
        from cm3leon_jax.data.tasks import validation_count

        try:
            store = PreparedDataset(path)
            total = len(store)
            first = total - min(n, validation_count(total, 0.01))  # the tasks' default validation_fraction
            return [str(store[i]["caption"]) for i in range(first, total) if store[i]["caption"]]
        except Exception:  # noqa: BLE001 - examples are a convenience, never a reason not to serve
            return []

    def command(self, r: req_lib.GenerateRequest) -> str:
        """The `cm3leon generate` command that writes the same samples."""
        c = self.config
        args = ["cm3leon", "generate", f"--model_dir={c.model_dir}", f"--prompt={r.prompt}",
                f"--num_samples={r.num_samples}", *r.decoding.flags(), f"--num_retrieved={r.num_retrieved}",
                f"--seed={r.seed}"]
        for flag in ("vqgan_dir", "text_tokenizer", "clip_dir", "data_dir"):
            if getattr(c, flag):
                args.append(f"--{flag}={getattr(c, flag)}")
        if c.quantize != "none":
            args.append(f"--quantize={c.quantize}")
        return " ".join(shlex.quote(a) for a in args + ["--out=samples"])

    # -- text -> image -------------------------------------------------------------
    @staticmethod
    def _rows_of(r: req_lib.GenerateRequest) -> int:
        return r.num_samples

    def _width(self, rows: int) -> int:
        """Rows per sampler call: the next power of two (at least 4), so a
        server compiles a handful of batch shapes, not one per request mix."""
        width = 4
        while width < rows:
            width *= 2
        return min(width, self.config.max_batch_rows)

    def _run_batch(self, key, batch: List[req_lib.GenerateRequest]):
        settings, num_retrieved = key
        items = [(r.prompt, r.seed, r.num_samples) for r in batch]
        results = self.g.images_for_requests(items, settings, num_retrieved, batch_rows=self.config.max_batch_rows,
                                             width=self._width(sum(r.num_samples for r in batch)),
                                             length_bucket=LENGTH_BUCKET)
        return [req_lib.RequestError(str(r)) if isinstance(r, ValueError) else r for r in results]

    def check_prompt(self, r: req_lib.GenerateRequest) -> None:
        """RequestError (422) for a prompt that is no tokens or that cannot
        fit the model's context with its image (before it is queued)."""
        tokens = self.g.text.encode(r.prompt).tolist()
        if not tokens:
            raise req_lib.RequestError("prompt has no text the tokenizer keeps: give the text to generate an "
                                       "image for")
        try:
            self.g.check_length(tokens + [0], "prompt")
        except ValueError as e:
            raise req_lib.RequestError(str(e)) from None

    def submit_generate(self, r: req_lib.GenerateRequest):
        """A future of (images, codes, retrieved); QueueFull when the queue is full."""
        return self.batcher.submit((r.decoding.settings(), r.num_retrieved), r)

    def generate_response(self, r: req_lib.GenerateRequest, imgs: np.ndarray, retrieved, seconds: float) -> dict:
        """Samples ordered by CLIP score (as `cm3leon generate` names its
        files), base64 PNGs saved as it saves them, the retrieved documents
        with their reconstructions, the settings and the command."""
        from cm3leon_jax.sampling import rerank, sampler

        if self.has_clip:
            order, scores = rerank.rerank(self.g.clip, r.prompt, imgs)
        else:
            order, scores = np.arange(len(imgs)), np.full(len(imgs), np.nan)
        mixed = r.decoding.decoding == "mixed"
        samples = [{"rank": rank, "sample": int(j), "png": req_lib.png_base64(imgs[j]),
                    "clip_score": None if np.isnan(scores[j]) else float(scores[j]),
                    "decoding": sampler.mixed_sample_decoding(j) if mixed else r.decoding.decoding}
                   for rank, j in enumerate(order)]
        docs = []
        for d in retrieved:
            doc = {"id": int(d["id"]), "caption": d.get("caption"), "score": float(d["score"]), "png": None}
            ids = np.asarray(d.get("image_ids", ()))
            if ids.size == self.g.vq.codes_per_image:
                image = self.g.vq.decode(self.g.b.vocab.id_to_image_code(ids)[None].astype(np.int32))[0]
                doc["png"] = req_lib.png_base64(image)
            docs.append(doc)
        return {"prompt": r.prompt, "seed": r.seed, "num_samples": r.num_samples, "num_retrieved": r.num_retrieved,
                "settings": dataclasses.asdict(r.decoding), "samples": samples, "retrieved": docs,
                "command": self.command(r), "model_dir": self.g.b.model_dir, "step": self.g.b.step,
                "seconds": round(seconds, 3)}

    # -- image -> text, editing ----------------------------------------------------
    def describe(self, r: req_lib.DescribeRequest) -> dict:
        t = time.time()
        with self._lock:
            text = self.g.text_from_image(r.image, r.prompt, r.decoding.settings(), r.seed, r.max_tokens)
        return {"prompt": r.prompt, "text": text, "seed": r.seed, "settings": dataclasses.asdict(r.decoding),
                "seconds": round(time.time() - t, 3)}

    def edit(self, r: req_lib.EditRequest) -> dict:
        if not self.is_sft:
            raise req_lib.RequestError("editing needs a fine-tuned model dir (`cm3leon finetune`); this one was "
                                       "trained on a pretraining task", 400)
        from cm3leon_jax.sft import infer

        t = time.time()
        with self._lock:
            images = infer.edit_image(self.g, r.image, r.prompt, r.num_samples,
                                      r.decoding.settings(r.image_cfg_scale), r.seed)
        return {"prompt": r.prompt, "seed": r.seed, "images": [req_lib.png_base64(i) for i in images],
                "image_cfg_scale": r.image_cfg_scale, "settings": dataclasses.asdict(r.decoding),
                "seconds": round(time.time() - t, 3)}

    # -- start-up ------------------------------------------------------------------
    def warm_up(self) -> float:
        """Compiles the text -> image sampler for the default settings at
        every batch width requests can use (4, 8, ... max_batch_rows),
        before the server says it is ready."""
        t = time.time()
        prompt = (self.example_prompts(1) or ["a red circle"])[0]
        widths = {self.config.max_batch_rows}
        width = self._width(1)
        while width < self.config.max_batch_rows:
            widths.add(width)
            width *= 2
        for rows in sorted(widths):
            r = req_lib.GenerateRequest(prompt=prompt, num_samples=rows, num_retrieved=min(2, self.max_retrieved))
            self._run_batch((r.decoding.settings(), r.num_retrieved), [r])
        return time.time() - t

    def info(self) -> dict:
        b = self.g.b
        return {"model_dir": b.model_dir, "step": b.step, "fine_tuned": self.is_sft,
                "max_retrieved": self.max_retrieved, "resolution": self.g.vq.resolution,
                "max_batch_rows": self.config.max_batch_rows, "max_queue": self.config.max_queue,
                "batches_run": len(self.batcher.batches), "largest_batch": max(self.batcher.batches, default=0)}

    def close(self) -> None:
        self.batcher.close()

