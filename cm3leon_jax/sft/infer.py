"""Running a fine-tuned model on instruction prompts (sft/format.py layout).

`complete(g, prompts, output=...)` batches many (instruction ids, input ids)
prompts through the jitted sampler:

- text outputs (detection, captioning, VQA): the decoding of `settings`
  (greedy by default for evaluation), never an image code, until `<eos>`;
- image outputs: exactly the VQ-GAN's code count of image codes. With
  guidance, a task with an input image uses two-scale guidance (streams:
  instruction + input, input only, neither; `image_cfg_scale` and
  `cfg_scale`), a task without one (spatially grounded generation) plain
  classifier-free guidance against `<mask:0> <break>`.

Prompt i's row draws from fold_in(PRNGKey(seed + i), 0), so the result does
not depend on how prompts are batched.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from cm3leon_jax.sft import format as fmt

Prompt = Tuple[Sequence[int], Sequence[int]]  # (instruction ids, input ids)


def complete(g, prompts: Sequence[Prompt], *, output: str, settings, seed: int = 0, batch_rows: int = 64,
             max_text_tokens: int = 64) -> List[np.ndarray]:
    """Per prompt: text ids (up to, not including, <eos>) or image codes [C]."""
    import jax
    import jax.numpy as jnp

    from cm3leon_jax.sampling import sampler

    if output not in ("text", "image"):
        raise ValueError(f"output must be text or image, got {output!r}")
    if not prompts:
        return []
    vocab = g.b.vocab
    mask = vocab.mask_id(0)
    streams = [fmt.prompt_streams(i, x, mask) for i, x in prompts]
    image = output == "image"
    guided = image and (settings.cfg_scale != 1.0 or settings.decoding in ("cd_k", "mixed"))
    two_scale = guided and all(len(x) for _, x in prompts)
    if guided and not two_scale and any(len(x) for _, x in prompts):
        raise ValueError("guided image prompts must all have an input image or all lack one")
    length = max(len(s) for trio in streams for s in trio)
    n_codes = g.vq.codes_per_image
    max_new = n_codes + 1 if image else max_text_tokens
    constraint = sampler.Constraint("image", image_tokens=n_codes) if image else sampler.Constraint("text")
    width = min(batch_rows, len(prompts))
    results: List[np.ndarray] = []
    for start in range(0, len(prompts), width):
        idx = list(range(start, min(start + width, len(prompts))))
        idx = idx + [idx[-1]] * (width - len(idx))
        keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(seed + i), 0) for i in idx])
        ct, cs = sampler.left_pad([streams[i][0] for i in idx], length=length)
        # one sample per record: "mixed" gives CD-K to every other record
        kw = {"cd_rows": np.array([i % 2 == 1 for i in idx])} if settings.decoding == "mixed" else {}
        if guided:
            # stream 2 = neither condition (the unconditional), stream 1 = input only
            ut, us = sampler.left_pad([streams[i][2] for i in idx], length=length)
            kw.update(uncond_prompts=jnp.asarray(ut), uncond_starts=jnp.asarray(us))
            if two_scale:
                it, ist = sampler.left_pad([streams[i][1] for i in idx], length=length)
                kw.update(image_only_prompts=jnp.asarray(it), image_only_starts=jnp.asarray(ist))
        out, n = sampler.generate(g.params, jnp.asarray(ct), jnp.asarray(cs), keys, cfg=g.b.cfg,
                                  max_new_tokens=max_new, settings=settings, constraint=constraint,
                                  vocab=vocab, **kw)
        out, n = np.asarray(out), np.asarray(n)
        for row in range(min(width, len(prompts) - start)):
            if image:
                results.append(vocab.id_to_image_code(out[row, :n_codes]).astype(np.int32))
            else:
                toks = out[row, :int(n[row])]
                results.append(toks[toks != vocab.eos_id])
    return results


def edit_image(g, image: np.ndarray, instruction: str, num_samples: int, settings, seed: int):
    """Image + instruction -> images (editing, image-to-image grounded
    generation) with a fine-tuned model's Generator `g`: uint8 [N, H, W, 3].
    With guidance, two-scale guidance (settings.image_cfg_scale and
    cfg_scale). Sample j draws from fold_in(PRNGKey(seed + j), 0)."""
    text = g.text.encode(instruction)
    if not text.size:
        raise ValueError("empty instruction: give --prompt")
    prompts = [(text.tolist(), g.image_ids(image).tolist())] * num_samples
    codes = complete(g, prompts, output="image", settings=settings, seed=seed)
    return g.vq.decode(np.stack(codes))
