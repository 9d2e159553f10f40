"""Import a Hugging Face CLIP checkpoint (transformers `CLIPModel` layout,
config.json + safetensors) into our CLIP params, and read/write the model
dir that holds it. Safetensors only: pickles are never loaded.

Key mapping (every tensor of the state dict but the `position_ids` buffers):
    text_model.encoder.layers.3.mlp.fc1.weight   -> text_model/encoder/layers_3/mlp/fc1/kernel  (transposed)
    text_model.final_layer_norm.weight           -> text_model/final_layer_norm/scale
    text_model.embeddings.token_embedding.weight -> text_model/embeddings/token_embedding/embedding
    vision_model.embeddings.patch_embedding.weight (OIHW) -> .../patch_embedding/kernel (HWIO)
    vision_model.embeddings.class_embedding      -> vision_model/embeddings/class_embedding
    text_projection.weight                       -> text_projection/kernel  (transposed)
    logit_scale                                  -> logit_scale

Model dir written by `convert_to_model_dir` / read by `load_clip`:
    clip_config.json   dataclasses.asdict(CLIPConfig)
    checkpoints/0/     Orbax checkpoint {"params": ...} (the project's Checkpointer)
    tokenizer/         the HF tokenizer files, when the source has them
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Dict, Tuple

import numpy as np

from cm3leon_jax.models import safetensors_io
from cm3leon_jax.models.clip import HF_TOKENIZER_FILES, TOKENIZER_SUBDIR, CLIPConfig

CONFIG_FILE = "clip_config.json"

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for
# keys an (older) config.json leaves out.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5)


# -- config ----------------------------------------------------------------------------

def _square(value, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{where}: vision_config.{name}={value} is not square; only square images are "
                             "supported")
        value = value[0]
    return int(value)


def _single_id(value, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{where}: text_config.{name}={value}: one id is needed for pooling")
        value = value[0]
    return int(value)


def config_from_hf(hf: dict, where: str = "config.json") -> CLIPConfig:
    """Our CLIPConfig from a transformers CLIP config dict (`model_type` "clip";
    missing keys take transformers' defaults; the legacy `text_config_dict` /
    `vision_config_dict` are honoured)."""
    model_type = hf.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"{where}: model_type={model_type!r}; a CLIPModel config (model_type 'clip') is needed")
    text = dict(_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {}))
    vision = dict(_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {}))
    for key in ("hidden_act", "layer_norm_eps"):
        if text[key] != vision[key]:
            raise ValueError(f"{where}: text_config.{key}={text[key]!r} differs from vision_config.{key}="
                             f"{vision[key]!r}; CLIPConfig has one {key} for both towers")
    return CLIPConfig(
        vocab_size=int(text["vocab_size"]), max_position_embeddings=int(text["max_position_embeddings"]),
        text_hidden_size=int(text["hidden_size"]), text_intermediate_size=int(text["intermediate_size"]),
        text_num_layers=int(text["num_hidden_layers"]), text_num_heads=int(text["num_attention_heads"]),
        bos_token_id=_single_id(text["bos_token_id"], "bos_token_id", where),
        eos_token_id=_single_id(text["eos_token_id"], "eos_token_id", where),
        pad_token_id=int(text["pad_token_id"] if text["pad_token_id"] is not None else 1),
        image_size=_square(vision["image_size"], "image_size", where),
        patch_size=_square(vision["patch_size"], "patch_size", where),
        num_channels=int(vision["num_channels"]), vision_hidden_size=int(vision["hidden_size"]),
        vision_intermediate_size=int(vision["intermediate_size"]),
        vision_num_layers=int(vision["num_hidden_layers"]), vision_num_heads=int(vision["num_attention_heads"]),
        projection_dim=int(hf.get("projection_dim", 512)), layer_norm_eps=float(text["layer_norm_eps"]),
        hidden_act=str(text["hidden_act"]), logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)))


# -- state dict ------------------------------------------------------------------------

def _is_ignored(key: str) -> bool:
    # position_ids are index buffers (arange), not weights
    return key.endswith("position_ids")


def hf_key_to_path(key: str, ndim: int) -> Tuple[Tuple[str, ...], bool]:
    """(our param path, transpose?) of a transformers CLIPModel state-dict key."""
    parts = key.split(".")
    path = []
    i = 0
    while i < len(parts) - 1:
        if parts[i] == "layers" and parts[i + 1].isdigit():
            path.append(f"layers_{parts[i + 1]}")
            i += 2
        else:
            path.append(parts[i])
            i += 1
    leaf = parts[-1]
    if leaf == "weight" and path:
        if path[-1] in ("token_embedding", "position_embedding"):
            return tuple(path + ["embedding"]), False
        if ndim in (2, 4):
            return tuple(path + ["kernel"]), True
        if ndim == 1:
            return tuple(path + ["scale"]), False  # LayerNorm
    if leaf == "bias":
        return tuple(path + ["bias"]), False
    return tuple(path + [leaf]), False  # unknown: reported as unexpected by the shape check


def path_to_hf_key(path: Tuple[str, ...]) -> str:
    """The transformers state-dict key of our param `path` (for messages)."""
    parts = [p.replace("layers_", "layers.") if p.startswith("layers_") else p for p in path]
    if len(parts) > 1 and parts[-1] in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_ours(value: np.ndarray, transpose: bool) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if transpose and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if transpose:
        return value.T  # torch Linear [out, in] -> Dense kernel [in, out]
    return value


def convert_state_dict(tensors: Dict[str, np.ndarray], cfg: CLIPConfig,
                       origin: Dict[str, str] | None = None) -> Tuple[dict, dict]:
    """transformers CLIPModel tensors -> (our params tree, report). Every
    parameter `cfg` implies must be present with its shape, and nothing else
    (but position_ids buffers): ValueError naming the keys and files."""
    import jax

    from cm3leon_jax.models.clip import abstract_params

    origin = origin or {}
    expected = {tuple(getattr(k, "key", str(k)) for k in path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(cfg))}
    params: dict = {}
    got_from: Dict[tuple, str] = {}
    unexpected, wrong, ignored = [], [], []
    wrong_paths = set()

    def where(key):
        return f"{key} ({origin[key]})" if key in origin else key

    for key, value in tensors.items():
        if _is_ignored(key):
            ignored.append(key)
            continue
        path, transpose = hf_key_to_path(key, np.ndim(value))
        if path not in expected:
            unexpected.append(where(key))
            continue
        value = _to_ours(value, transpose)
        if tuple(value.shape) != expected[path]:
            want = expected[path]
            if transpose:  # say it in the file's layout
                want = tuple(want[::-1]) if len(want) == 2 else (want[3], want[2], want[0], want[1])
            wrong.append(f"{where(key)}: shape {tuple(np.shape(tensors[key]))}, expected {want}")
            wrong_paths.add(path)
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
        got_from[path] = key
    missing = sorted(path_to_hf_key(p) for p in expected if p not in got_from and p not in wrong_paths)
    if missing or unexpected or wrong:
        files = sorted(set(origin.values()))
        raise ValueError(
            f"{', '.join(files) or 'checkpoint'}: does not match the CLIP its config.json describes: "
            + "; ".join(f"{name} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                        for name, items in (("missing", missing), ("unexpected", unexpected),
                                            ("wrong shapes", wrong)) if items))
    return params, {"tensors_used": len(got_from), "ignored": ignored}


def load_hf_clip(path: str) -> Tuple[CLIPConfig, dict, dict]:
    """(CLIPConfig, params, report) from `path`: a directory with config.json
    and *.safetensors (transformers `CLIPModel.save_pretrained`), or one
    .safetensors file with a config.json beside it."""
    files, cfg_path = safetensors_io.source_files(path)
    if not os.path.exists(cfg_path):
        raise ValueError(f"{cfg_path} not found: the CLIP checkpoint's config.json is needed for its sizes")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    tensors, origin = safetensors_io.read_tensors(files)
    params, report = convert_state_dict(tensors, cfg, origin)
    report.update(files=[os.path.basename(f) for f in files])
    return cfg, params, report


# -- model dir -------------------------------------------------------------------------

def write_params_dir(model_dir: str, config_file: str, cfg, params, source: str) -> None:
    """`model_dir/config_file` (dataclasses.asdict(cfg)) and an Orbax
    checkpoint {"params": params} at step 0 under checkpoints/, as
    `vqgan_convert.convert_to_model_dir` writes its model dirs."""
    import jax
    import jax.numpy as jnp

    from cm3leon_jax import checkpoints as ckpt_lib

    _write_config(model_dir, config_file, cfg)
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(model_dir), 1, None, async_save=False)
    ckpt.save(0, {"params": jax.tree.map(jnp.asarray, params)}, {"source": os.path.abspath(source)}, force=True)
    ckpt.close()


def read_params_dir(model_dir: str, abstract) -> dict:
    """The params of the latest checkpoint in `model_dir` (as `load_vqgan`
    reads them), checked against the tree and shapes of `abstract`."""
    import jax
    import orbax.checkpoint as ocp

    from cm3leon_jax import checkpoints as ckpt_lib

    ckptr = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(model_dir), 1, None, async_save=False)
    step = ckptr.latest_step()
    ckptr.close()
    if step is None:
        raise ValueError(f"{model_dir}: no checkpoint found under checkpoints/")
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(ckpt_lib.checkpoint_dir(model_dir), str(step), ckpt_lib.STATE))
    params = restored["params"] if "params" in restored else restored
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
        raise ValueError(f"{model_dir}: checkpoint step {step} does not match its config: "
                         + ", ".join(f"{k} {got.get(k, 'missing')} vs {want.get(k, 'unexpected')}"
                                     for k in bad[:6]))
    return params


def _write_config(model_dir: str, config_file: str, cfg) -> None:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, config_file), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)


def save_config(model_dir: str, cfg: CLIPConfig) -> None:
    _write_config(model_dir, CONFIG_FILE, cfg)


def load_config(model_dir: str) -> CLIPConfig:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: {model_dir} is not a CLIP model dir (import one with "
                         "`cm3leon convert clip --input=HF_DIR --out=DIR`)")
    with open(path) as f:
        return CLIPConfig(**json.load(f))


def load_clip(model_dir: str) -> Tuple[CLIPConfig, dict]:
    """(CLIPConfig, params) from a model dir written by `convert_to_model_dir`."""
    from cm3leon_jax.models.clip import abstract_params

    cfg = load_config(model_dir)
    return cfg, read_params_dir(model_dir, abstract_params(cfg))


def convert_to_model_dir(src: str, out_dir: str) -> dict:
    """Converts `src` (see `load_hf_clip`) and writes `out_dir` in the layout
    `load_clip` reads, copying the HF tokenizer files found beside the
    weights into `out_dir/tokenizer/`. Returns a JSON-able report."""
    cfg, params, report = load_hf_clip(src)
    write_params_dir(out_dir, CONFIG_FILE, cfg, params, src)
    src_dir = src if os.path.isdir(src) else (os.path.dirname(src) or ".")
    copied = []
    for name in HF_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            os.makedirs(os.path.join(out_dir, TOKENIZER_SUBDIR), exist_ok=True)
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, TOKENIZER_SUBDIR, name))
            copied.append(name)
    n_params = int(sum(np.size(v) for v in _leaves(params)))
    return dict(out=out_dir, tensors_used=report["tensors_used"], ignored=len(report["ignored"]),
                files=report["files"], params=n_params, projection_dim=cfg.projection_dim,
                image_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.max_position_embeddings,
                legacy_argmax_pooling=cfg.legacy_argmax_pooling, tokenizer_files=copied)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree
