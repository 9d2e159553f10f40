"""Import a Chameleon / Anole checkpoint (transformers'
`ChameleonForConditionalGeneration`, safetensors only: never pickle) into a
cm3leon model dir that `sampling/generate.load_model` reads.

    cm3leon convert chameleon --hf_dir=DIR --out=OUT

CM3Leon's own weights were never released; Chameleon (and Anole, its
image-generating fine-tune) is the nearest public model. Its architecture is
our decoder with the options `DecoderConfig(norm="rmsnorm",
positions="rotary", qk_norm=True, mlp_type="gated", activation="silu")`,
plus `swin_norm` (Chameleon-34B) and `num_kv_heads` (GQA) when the HF config
sets them (models/decoder_config.py documents each option).

Output layout (OUT):
    config.gin            DecoderConfig (the options above, the sizes) and the
                          UnifiedVocabulary block sizes
    checkpoints/0/state   Orbax checkpoint {"params": ...} (what the trainer
                          writes; `load_model` and `--init_checkpoint` read it)
    vocab_mapping.json    the id permutation below, both directions
    conversion.json       the report printed by the command
The `model.vqmodel.*` tensors are skipped: transformers' Chameleon keeps only
the VQ-VAE's encoder (no image decoder), so `cm3leon generate` needs a full
VQ-GAN with the same 8,192-code codebook through --vqgan_dir.

Weight mapping (torch Linear weights are [out, in]; ours are [in, out...]):
    model.embed_tokens.weight [V, d]          -> token_embedding (rows permuted)
    lm_head.weight [V, d]                     -> output_projection [d, V] (columns
                                                 permuted; the embedding when tied)
    layers.i.self_attn.{q,k,v}_proj.weight    -> layers/attention/{query,key,value}
                                                 [d, heads, head_dim]
    layers.i.self_attn.o_proj.weight          -> layers/attention/out [heads, head_dim, d]
    layers.i.self_attn.{q,k}_norm.{weight,bias} -> {query,key}_norm_{scale,bias}
    layers.i.mlp.{gate,up,down}_proj.weight   -> layers/mlp/{wi_gate,wi,wo}
    layers.i.input_layernorm.weight           -> layers/attention_norm
    layers.i.post_attention_layernorm.weight  -> layers/mlp_norm
    model.norm.weight                         -> final_norm
Layers are stacked along a leading [layers] axis (scan_layers=True).

Vocabulary (the choice made here). Chameleon's 65,536 ids hold its image
tokens inside the BPE vocabulary (names IMGIMG<digits as letters A-J>Z, ids
4..8195 in Chameleon-7B; transformers' ChameleonImageVocabularyMapping turns
a name into its VQ codebook index). Our sampler expects image code i at id
S + i (vocab.py). The converter applies ONE permutation of the ids to the
rows of the embedding and the columns of the output projection, so the model
computes exactly what Chameleon computes, the vocabulary size is unchanged
(no row duplicated, none invented), and the mapping is written to
vocab_mapping.json:
  * specials [0, S), S = 4 + M: Chameleon's own tokens moved to our special
    ids, chosen by what our code does with each id:
        0 <pad>     <- <s> (BOS): the sampler feeds id 0 before every prompt
                       and training shifts targets right behind a 0, which is
                       where Chameleon saw <s>; padding slots are never
                       attended, so their token does not matter
        1 <eos>     <- </s>
        2 <break>   <- <racm3:break> (Chameleon's begin-of-image token)
        3 <infill>  <- <eoss> (Chameleon's end-of-image; in the RA-CM3
                       tokenizer it is the end-of-sentinel token, CM3's infill
                       separator)
        4 + i <mask:i> <- <sentinel:i> for i < M (M = --num_mask_tokens, 32 by
                       default, or fewer when the vocabulary has fewer); a
                       vocabulary without <sentinel:i> tokens uses its
                       <reserved#####> tokens in id order instead
    (one difference remains: our sampler ends an image with <eos> = </s>,
    where Chameleon emits <eoss>);
  * image codes [S, S + C): HF token of codebook index i -> S + i (C must be
    the VQ-VAE's codebook size and the indices exactly 0..C-1);
  * text [S + C, V): every other HF id (text BPE, <pad>, <image>, unused
    sentinels and reserved tokens), in increasing HF id order.
A prompt tokenised with Chameleon's tokenizer is mapped with `to_ours` (the
"hf_to_ours" table); generated ids go back with `to_hf` ("ours_to_hf").
Chameleon's tokenizer has added tokens, which our `TextTokenizer` (a plain
byte-level BPE offset into the text block) does not accept, so the text side
of `cm3leon generate` needs that mapping around Chameleon's tokenizer.

transformers' forward also sets the logits of the raw image tokens to the
dtype's minimum (Chameleon-7B was released without image generation); we do
not: which ids may be generated is the sampler's `Constraint`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from cm3leon_jax.models import safetensors_io

MAPPING_FILE = "vocab_mapping.json"
REPORT_FILE = "conversion.json"
IMAGE_TOKEN_PREFIX = "IMGIMG"

# our special id -> (role, Chameleon token names tried in order)
SPECIAL_TOKENS = ((0, "<pad>", ("<s>",)), (1, "<eos>", ("</s>",)), (2, "<break>", ("<racm3:break>",)),
                  (3, "<infill>", ("<eoss>",)))


class ConversionError(ValueError):
    """A checkpoint this converter cannot map (one line, naming the field)."""


# --------------------------------------------------------------------------- config
def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type != "default":
        raise ConversionError(f"config.json: rope_parameters.rope_type={rope_type!r} is not supported "
                              "(only the default rotary embedding)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def decoder_options(hf: dict, dtype: str = "bfloat16", param_dtype: str = "float32") -> dict:
    """Our DecoderConfig fields (but vocab_size) for a Chameleon config dict;
    ConversionError naming the field it cannot represent."""
    if hf.get("model_type") != "chameleon":
        raise ConversionError(f"config.json: model_type={hf.get('model_type')!r}; expected 'chameleon' "
                              "(a transformers ChameleonForConditionalGeneration checkpoint)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ConversionError(f"config.json: {field}=True is not supported (our decoder has no bias terms)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "relu"):
        raise ConversionError(f"config.json: hidden_act={act!r} is not supported (silu or relu)")
    d, heads = int(hf.get("hidden_size", 4096)), int(hf.get("num_attention_heads", 32))
    if d % heads:
        raise ConversionError(f"config.json: hidden_size={d} is not divisible by num_attention_heads={heads}")
    if hf.get("head_dim") not in (None, d // heads):
        raise ConversionError(f"config.json: head_dim={hf['head_dim']} differs from hidden_size / "
                              f"num_attention_heads = {d // heads}, which is not supported")
    kv = hf.get("num_key_value_heads") or heads
    if heads % int(kv):
        raise ConversionError(f"config.json: num_key_value_heads={kv} does not divide "
                              f"num_attention_heads={heads}")
    return dict(
        num_layers=int(hf.get("num_hidden_layers", 32)), d_model=d, num_heads=heads,
        d_ff=int(hf.get("intermediate_size", 11008)), max_length=int(hf.get("max_position_embeddings", 4096)),
        activation=act, dtype=dtype, param_dtype=param_dtype,
        layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)), scan_layers=True, remat_policy="none",
        norm="rmsnorm", swin_norm=bool(hf.get("swin_norm", False)), positions="rotary",
        rope_theta=_rope_theta(hf), qk_norm=True, qk_norm_epsilon=1e-5,  # ChameleonLayerNorm: eps fixed 1e-5
        mlp_type="gated", num_kv_heads=None if int(kv) == heads else int(kv))


# --------------------------------------------------------------------------- vocabulary
def _image_code(name: str) -> int:
    """IMGIMG<digits spelt A-J>Z -> the codebook index (transformers' bpe2img)."""
    body = name[len(IMAGE_TOKEN_PREFIX):-1]
    if not body or not all("A" <= c <= "J" for c in body):
        raise ConversionError(f"vocabulary_map: image token {name!r} is not IMGIMG<letters A-J>Z")
    return int("".join(str(ord(c) - ord("A")) for c in body))


def build_vocab_mapping(vocab_map: Dict[str, int], vocab_size: int, num_codes: Optional[int],
                        num_mask_tokens: int = 32) -> dict:
    """The id permutation of the module docstring, as a JSON-able dict."""
    if not vocab_map:
        raise ConversionError("config.json: vocabulary_map is missing; it names the image tokens (IMGIMG...)")
    if num_mask_tokens < 1:
        raise ConversionError(f"--num_mask_tokens must be >= 1, got {num_mask_tokens}")
    name_of = {}
    for name, i in vocab_map.items():
        if not 0 <= int(i) < vocab_size:
            raise ConversionError(f"vocabulary_map: {name!r} has id {i} outside vocab_size={vocab_size}")
        name_of.setdefault(int(i), name)
    image = {}
    for name, i in vocab_map.items():
        if name.startswith(IMAGE_TOKEN_PREFIX):
            code = _image_code(name)
            if code in image:
                raise ConversionError(f"vocabulary_map: two tokens for image code {code}")
            image[code] = int(i)
    if not image:
        raise ConversionError("vocabulary_map: no image tokens (names starting IMGIMG)")
    c = len(image)
    if sorted(image) != list(range(c)):
        raise ConversionError(f"vocabulary_map: the {c} image tokens are not codes 0..{c - 1}")
    if num_codes is not None and c != num_codes:
        raise ConversionError(f"vocabulary_map has {c} image tokens but vq_config.num_embeddings={num_codes}")

    specials: List[Tuple[int, str, str, int]] = []   # (our id, role, hf name, hf id)
    for ours, role, names in SPECIAL_TOKENS:
        found = next((n for n in names if n in vocab_map), None)
        if found is None:
            raise ConversionError(f"vocabulary_map: no {' / '.join(names)} token for our {role} (id {ours})")
        specials.append((ours, role, found, int(vocab_map[found])))
    taken = {hf for *_, hf in specials} | set(image.values())
    sentinels = []
    while len(sentinels) < num_mask_tokens and f"<sentinel:{len(sentinels)}>" in vocab_map:
        sentinels.append(f"<sentinel:{len(sentinels)}>")
    if not sentinels:  # no CM3 sentinels: stand-ins from the reserved tokens
        reserved = sorted((int(i), n) for n, i in vocab_map.items()
                          if re.fullmatch(r"<reserved\d+>", n) and int(i) not in taken)
        sentinels = [n for _, n in reserved[:num_mask_tokens]]
    if not sentinels:
        raise ConversionError("vocabulary_map: no <sentinel:i> or <reserved#####> tokens for our <mask:i> ids")
    m = len(sentinels)
    for i, name in enumerate(sentinels):
        specials.append((4 + i, f"<mask:{i}>", name, int(vocab_map[name])))
    hf_ids = [hf for *_, hf in specials]
    if len(set(hf_ids)) != len(hf_ids) or set(hf_ids) & set(image.values()):
        raise ConversionError("vocabulary_map: a special token shares its id with another or an image token")

    s = 4 + m
    ours_to_hf = np.empty(vocab_size, np.int64)
    ours_to_hf[:s] = hf_ids
    ours_to_hf[s:s + c] = [image[i] for i in range(c)]
    used = set(hf_ids) | set(image.values())
    rest = [i for i in range(vocab_size) if i not in used]
    ours_to_hf[s + c:] = rest
    hf_to_ours = np.empty(vocab_size, np.int64)
    hf_to_ours[ours_to_hf] = np.arange(vocab_size)
    return {
        "format": "cm3leon-chameleon-vocab/1",
        "vocab_size": vocab_size,
        "layout": {"num_special_tokens": s, "num_mask_tokens": m, "image_codebook_size": c,
                   "text_vocab_size": vocab_size - s - c},
        "specials": [{"ours": o, "role": r, "hf_name": n, "hf": h} for o, r, n, h in specials],
        "hf_to_ours": hf_to_ours.tolist(),
        "ours_to_hf": ours_to_hf.tolist(),
    }


def load_mapping(model_dir: str) -> dict:
    path = os.path.join(model_dir, MAPPING_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: not a `cm3leon convert chameleon` model dir")
    with open(path) as f:
        return json.load(f)


def to_ours(hf_ids, mapping: dict) -> np.ndarray:
    """Chameleon ids -> our unified ids."""
    return np.asarray(mapping["hf_to_ours"], np.int64)[np.asarray(hf_ids)]


def to_hf(ids, mapping: dict) -> np.ndarray:
    """Our unified ids -> Chameleon ids."""
    return np.asarray(mapping["ours_to_hf"], np.int64)[np.asarray(ids)]


# --------------------------------------------------------------------------- weights
_LAYER_KEYS = {  # HF suffix under model.layers.i. -> (our sub-tree, leaf)
    "self_attn.q_proj.weight": ("attention", "query"),
    "self_attn.k_proj.weight": ("attention", "key"),
    "self_attn.v_proj.weight": ("attention", "value"),
    "self_attn.o_proj.weight": ("attention", "out"),
    "self_attn.q_norm.weight": ("attention", "query_norm_scale"),
    "self_attn.q_norm.bias": ("attention", "query_norm_bias"),
    "self_attn.k_norm.weight": ("attention", "key_norm_scale"),
    "self_attn.k_norm.bias": ("attention", "key_norm_bias"),
    "mlp.gate_proj.weight": ("mlp", "wi_gate"),
    "mlp.up_proj.weight": ("mlp", "wi"),
    "mlp.down_proj.weight": ("mlp", "wo"),
    "input_layernorm.weight": (None, "attention_norm"),
    "post_attention_layernorm.weight": (None, "mlp_norm"),
}


def convert_state_dict(tensors: Dict[str, np.ndarray], opts: dict, mapping: dict,
                       tie_word_embeddings: bool = False) -> Tuple[dict, dict]:
    """HF tensors -> (our params tree with stacked layers, report)."""
    d, h, L = opts["d_model"], opts["num_heads"], opts["num_layers"]
    k = d // h
    g = opts["num_kv_heads"] or h
    perm = np.asarray(mapping["ours_to_hf"], np.int64)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    layers = [dict(attention={}, mlp={}) for _ in range(L)]
    top = {}
    unused = []
    for key, value in tensors.items():
        if key.startswith(("model.vqmodel.", "vqmodel.")):
            continue  # the VQ-VAE's encoder: not the decoder's business
        if key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            top[key] = value
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if not m or m.group(2) not in _LAYER_KEYS or int(m.group(1)) >= L:
            unused.append(key)
            continue
        i, (sub, leaf) = int(m.group(1)), _LAYER_KEYS[m.group(2)]
        w = f32(value)
        if leaf in ("query", "key", "value"):
            w = w.T.reshape(d, -1, k)                 # [heads*hd, d] -> [d, heads, hd]
        elif leaf == "out":
            w = w.T.reshape(h, k, d)                  # [d, heads*hd] -> [heads, hd, d]
        elif leaf in ("wi_gate", "wi", "wo"):
            w = w.T
        (layers[i][sub] if sub else layers[i])[leaf] = w
    if unused:
        raise ConversionError(f"checkpoint has {len(unused)} tensors this converter does not map, e.g. "
                              f"{unused[:3]} (a different architecture?)")
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if name not in top:
            raise ConversionError(f"checkpoint has no {name}")
    emb = f32(top["model.embed_tokens.weight"])
    head = top.get("lm_head.weight")
    if head is None:
        if not tie_word_embeddings:
            raise ConversionError("checkpoint has no lm_head.weight (and tie_word_embeddings is False)")
        head = emb
    head = f32(head)
    v = mapping["vocab_size"]
    for name, a in (("model.embed_tokens.weight", emb), ("lm_head.weight", head)):
        if a.shape != (v, d):
            raise ConversionError(f"{name} is {a.shape}, expected (vocab_size={v}, hidden_size={d})")
    expected = {"attention": {"query": (d, h, k), "key": (d, g, k), "value": (d, g, k), "out": (h, k, d),
                              "query_norm_scale": (h, k), "query_norm_bias": (h, k),
                              "key_norm_scale": (g, k), "key_norm_bias": (g, k)},
                "mlp": {"wi_gate": (d, opts["d_ff"]), "wi": (d, opts["d_ff"]), "wo": (opts["d_ff"], d)},
                "attention_norm": (d,), "mlp_norm": (d,)}
    for i, layer in enumerate(layers):
        for sub, want in expected.items():
            items = want.items() if isinstance(want, dict) else [(None, want)]
            for leaf, shape in items:
                got = layer.get(sub) if leaf is None else layer[sub].get(leaf)
                hf_name = next(s for s, t in _LAYER_KEYS.items() if t == ((sub, leaf) if leaf else (None, sub)))
                if got is None:
                    raise ConversionError(f"checkpoint has no model.layers.{i}.{hf_name}")
                if got.shape != shape:
                    raise ConversionError(f"model.layers.{i}.{hf_name} has shape {got.shape}, config implies "
                                          f"{shape}")
    stacked = {
        sub: ({leaf: np.stack([layer[sub][leaf] for layer in layers]) for leaf in layers[0][sub]}
              if isinstance(layers[0][sub], dict) else np.stack([layer[sub] for layer in layers]))
        for sub in layers[0]}
    params = {
        "token_embedding": emb[perm],
        "output_projection": np.ascontiguousarray(head[perm].T),
        "final_norm": f32(top["model.norm.weight"]),
        "layers": stacked,
    }
    n = sum(int(np.prod(a.shape)) for a in _leaves(params))
    return params, {"parameters": n, "tied_output": "lm_head.weight" not in top}


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


# --------------------------------------------------------------------------- model dir
def gin_config(opts: dict, layout: dict, vocab_size: int, source: str) -> str:
    lines = [f"# Written by `cm3leon convert chameleon` from {source}",
             "# (cm3leon_jax/models/chameleon_convert.py; id mapping in vocab_mapping.json).", ""]
    for k in ("num_special_tokens", "num_mask_tokens", "image_codebook_size", "text_vocab_size"):
        lines.append(f"UnifiedVocabulary.{k} = {layout[k]}")
    lines.append(f"DecoderConfig.vocab_size = {vocab_size}")
    for k, v in opts.items():
        lines.append(f"DecoderConfig.{k} = {v!r}")
    return "\n".join(lines) + "\n"


def convert_to_model_dir(hf_dir: str, out_dir: str, num_mask_tokens: int = 32, dtype: str = "bfloat16",
                         param_dtype: str = "float32") -> dict:
    """Converts `hf_dir` and writes `out_dir` (see the module docstring).
    ValueError (one line) for a bad input."""
    files, cfg_path = safetensors_io.source_files(hf_dir, "--hf_dir", allow_file=False)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path} not found: the model's config.json is needed for its sizes")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    from cm3leon_jax.models.decoder_config import DecoderConfig, as_dtype

    as_dtype(dtype), as_dtype(param_dtype)
    opts = decoder_options(hf, dtype, param_dtype)
    vocab_size = int(hf.get("vocab_size", 65536))
    num_codes = (hf.get("vq_config") or {}).get("num_embeddings")
    mapping = build_vocab_mapping(hf.get("vocabulary_map") or {}, vocab_size, num_codes, num_mask_tokens)
    layout = mapping["layout"]
    if os.path.isdir(os.path.join(out_dir, "checkpoints")) and os.listdir(os.path.join(out_dir, "checkpoints")):
        raise ValueError(f"--out {out_dir!r} already holds checkpoints; choose an empty dir")
    cfg = DecoderConfig(vocab_size=vocab_size, **opts)  # validates the options
    from cm3leon_jax import vocab as vocab_lib

    vocab = vocab_lib.UnifiedVocabulary(**layout)
    assert vocab.size == cfg.vocab_size
    tensors, _ = safetensors_io.read_tensors(files)
    params, report = convert_state_dict(tensors, opts, mapping, bool(hf.get("tie_word_embeddings", False)))
    _check_against_model(params, cfg)

    import jax
    import jax.numpy as jnp

    from cm3leon_jax import checkpoints as ckpt_lib

    del tensors
    os.makedirs(out_dir, exist_ok=True)
    source = os.path.abspath(hf_dir)
    with open(os.path.join(out_dir, "config.gin"), "w") as f:
        f.write(gin_config(opts, layout, vocab_size, source))
    with open(os.path.join(out_dir, MAPPING_FILE), "w") as f:
        json.dump(mapping, f)
    pdt = as_dtype(param_dtype)
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(out_dir), 1, None, async_save=False)
    ckpt.save(0, {"params": jax.tree.map(lambda a: jnp.asarray(a, pdt), params)}, {"source": source}, force=True)
    ckpt.close()
    out = {"out": os.path.abspath(out_dir), "source": source, "vocab_size": vocab_size, **layout,
           "num_layers": cfg.num_layers, "d_model": cfg.d_model, "num_heads": cfg.num_heads,
           "num_kv_heads": cfg.kv_heads, "swin_norm": cfg.swin_norm, "rope_theta": cfg.rope_theta,
           "parameters": report["parameters"], "tied_output": report["tied_output"],
           "specials": {s["role"]: s["hf_name"] for s in mapping["specials"][:4]}}
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(out, f, indent=1)
    return out


def _check_against_model(params: dict, cfg) -> None:
    """The converted tree must be exactly the one `Decoder(cfg).init` makes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from cm3leon_jax.models.decoder import Decoder

    abstract = nn.meta.unbox(jax.eval_shape(
        lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise AssertionError(f"converted params do not match Decoder({cfg}): {diff[:5]}")
