"""Sampler throughput on CPU: our jitted KV-cache sampler vs transformers' PyTorch OPT `generate`.

One run, one configuration (vocabulary 8,192, d_model 512, 8 layers, 8
heads, d_ff 2,048, fp32; batch 4, a 64-token prompt, 1,024 new tokens,
temperature 1 / top-p 0.9), the same random weights in both (our decoder's
params exported with `models.hf_opt.to_hf_opt`):

  (a) ours: `sampling.sampler.generate` (prefill + `lax.while_loop`, one
      token per step from the KV cache, everything inside one jit);
  (b) `OPTForCausalLM.generate(do_sample=True, top_p=0.9, top_k=0,
      use_cache=True)`, eager PyTorch on all cores;
  (c) ours with classifier-free guidance (cfg_scale 3: the conditional and
      unconditional prompts as one doubled batch) against (a): the cost of CFG.

<eos> is disallowed in both so every run makes exactly 1,024 tokens per row.
Each side is warmed up (XLA compile; a short torch generate), then timed in
alternating rounds; the median gives tokens/s (batch x new tokens / s).
The last line printed is one JSON object. Quick run: `--new_tokens 64
--rounds 1`.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from common import make_parser, say, torch_all_cores


def main():
    p = make_parser(__doc__)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cm3leon_jax import vocab as vocab_lib
    from cm3leon_jax.models.decoder import Decoder
    from cm3leon_jax.models.decoder_config import DecoderConfig
    from cm3leon_jax.sampling import sampler

    total = args.prompt_tokens + args.new_tokens
    cfg = DecoderConfig(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
                        d_ff=4 * args.d_model, max_length=total, dtype="float32", param_dtype="float32")
    # a vocabulary of this size for the id layout (eos/pad ids are the specials)
    vocab = vocab_lib.UnifiedVocabulary(num_special_tokens=64, num_mask_tokens=32, image_codebook_size=0,
                                        text_vocab_size=args.vocab - 64)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(args.seed), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(jnp.asarray, params)
    # the output projection is zero-initialised: random weights, so the logits are not flat
    params["output_projection"] = 0.05 * jax.random.normal(jax.random.PRNGKey(args.seed + 1),
                                                           params["output_projection"].shape)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(64, args.vocab, size=(args.batch, args.prompt_tokens)).astype(np.int32)
    uncond = prompt.copy()
    uncond[:, -8:] = vocab.mask_id(0)
    starts = np.zeros(args.batch, np.int32)
    settings = sampler.SamplingSettings("top_p", temperature=1.0, top_p=0.9)
    guided = sampler.SamplingSettings("top_p", temperature=1.0, top_p=0.9, cfg_scale=3.0)
    constraint = sampler.Constraint("none", allow_eos=False)
    n_new = args.new_tokens

    def ours(s, seed, cfg_stream):
        kw = dict(uncond_prompts=jnp.asarray(uncond), uncond_starts=jnp.asarray(starts)) if cfg_stream else {}
        out, lengths = sampler.generate(params, jnp.asarray(prompt), jnp.asarray(starts), jax.random.PRNGKey(seed),
                                        cfg=cfg, max_new_tokens=n_new, settings=s, constraint=constraint,
                                        vocab=vocab, **kw)
        out.block_until_ready()
        assert int(np.min(np.asarray(lengths))) == n_new
        return np.asarray(out)

    t = time.time()
    ours(settings, 0, False)
    say(f"ours: compile + first run {time.time() - t:.1f} s")
    t = time.time()
    ours(guided, 0, True)
    say(f"ours with CFG: compile + first run {time.time() - t:.1f} s")

    model = None
    if not args.skip_torch:
        import torch

        from cm3leon_jax.models.hf_opt import to_hf_opt

        torch_all_cores()
        model = to_hf_opt(cfg, jax.tree.map(np.asarray, params))
        ids = torch.from_numpy(prompt.astype(np.int64))
        mask = torch.ones_like(ids)

        def hf(seed, n=n_new):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.9, top_k=0,
                                     temperature=1.0, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                     pad_token_id=vocab.pad_id, eos_token_id=vocab.eos_id,
                                     suppress_tokens=[vocab.eos_id])
            assert out.shape[1] == args.prompt_tokens + n
            return out

        t = time.time()
        hf(0, 16)
        say(f"torch: warm-up generate (16 tokens) {time.time() - t:.1f} s")

    rates = {"ours": [], "ours_cfg": [], "torch": []}
    for r in range(args.rounds):
        order = ["ours", "ours_cfg", "torch"] if r % 2 == 0 else ["torch", "ours_cfg", "ours"]
        for side in order:
            if side == "torch" and model is None:
                continue
            t = time.time()
            if side == "torch":
                hf(r + 1)
            else:
                ours(guided if side == "ours_cfg" else settings, r + 1, side == "ours_cfg")
            dt = time.time() - t
            rates[side].append(args.batch * n_new / dt)
            say(f"round {r + 1} {side}: {rates[side][-1]:.1f} tokens/s ({1000 * dt / n_new:.1f} ms per step)")
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    result = {"benchmark": "sampler", "config": {"vocab": args.vocab, "d_model": args.d_model, "layers": args.layers,
                                                 "heads": args.heads, "batch": args.batch,
                                                 "prompt_tokens": args.prompt_tokens, "new_tokens": n_new,
                                                 "dtype": "float32", "top_p": 0.9},
              "tokens_per_sec_ours": round(med["ours"], 2), "tokens_per_sec_ours_cfg": round(med["ours_cfg"], 2),
              "ms_per_step_ours": round(1000 * args.batch / med["ours"], 2),
              "cfg_cost": round(med["ours"] / med["ours_cfg"], 3), "cfg_cost_target": 1.6,
              "rounds": args.rounds, "cpu_count": os.cpu_count()}
    if "torch" in med:
        result.update(tokens_per_sec_torch=round(med["torch"], 2),
                      ms_per_step_torch=round(1000 * args.batch / med["torch"], 2),
                      ratio=round(med["ours"] / med["torch"], 3), ratio_target=3.0)
        say(f"ratio ours/torch: {result['ratio']:.2f}x (target >= 3x); CFG cost {result['cfg_cost']:.2f}x "
            "(target <= 1.6x)")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
