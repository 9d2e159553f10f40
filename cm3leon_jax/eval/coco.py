"""`cm3leon eval coco`: the paper's MS-COCO 30K zero-shot FID protocol on a
local copy of COCO captions (nothing is downloaded).

Protocol (the one text-to-image papers report as "MS-COCO 30K", CM3Leon's
Table 1):
  1. `num_images` distinct images of the split are drawn with a fixed seed
     (all of them when the split has fewer, with a warning), and one of each
     image's captions, also with that seed;
  2. one image is generated per caption with the given decoding (default:
     the paper's best, 2 retrieved documents, CFG, 8 samples of mixed
     top-p / CD-K reranked by CLIP, of which the best is kept);
  3. the real images are resized (shorter side) and centre-cropped to the
     generator's resolution, like the generated ones;
  4. FID between the two sets, on InceptionV3 pool3 features (the standard
     pytorch-fid / clean-fid network, from the weights file you supply) or
     on CLIP features.

Layout read (the COCO 2014 release as unpacked from its zips):
  COCO_DIR/annotations/captions_val2014.json
  COCO_DIR/val2014/COCO_val2014_000000XXXXXX.jpg
(`--split=train2014` for the other file pair). Output: OUT/real/, OUT/fake/
(one PNG per selected image, named by COCO image id), OUT/captions.jsonl
(the selection) and OUT/fid.json. A rerun with the same flags keeps the
images already generated and continues; other flags on the same OUT are
refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import List, Optional

import numpy as np

SELECTION_FILE = "captions.jsonl"
SETTINGS_FILE = "protocol.json"
RESULT_FILE = "fid.json"


@dataclasses.dataclass(frozen=True)
class CocoPair:
    image_id: int
    file: str
    caption: str


def load_captions(coco_dir: str, split: str = "val2014") -> dict:
    """{image_id: (image file, [captions])} from COCO's captions json;
    ValueError naming the missing or malformed file."""
    ann = os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    if not os.path.isfile(ann):
        raise ValueError(f"COCO captions {ann!r} not found: --coco_dir must hold annotations/captions_{split}.json "
                         f"and {split}/ (the COCO 2014 release, unzipped)")
    try:
        with open(ann) as f:
            data = json.load(f)
        images = {int(im["id"]): im["file_name"] for im in data["images"]}
        captions = {}
        for a in data["annotations"]:
            text = " ".join(str(a["caption"]).split())
            if text:
                captions.setdefault(int(a["image_id"]), []).append(text)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ann!r} is not a COCO captions file ({type(e).__name__}: {e})") from None
    out = {}
    for image_id, name in images.items():
        if captions.get(image_id):
            out[image_id] = (os.path.join(coco_dir, split, name), captions[image_id])
    if not out:
        raise ValueError(f"{ann!r} has no image with a non-empty caption")
    return out


def select_pairs(captions: dict, num_images: int, seed: int) -> List[CocoPair]:
    """`num_images` distinct images (sorted ids, then a seeded permutation)
    and one caption each, drawn with the same seed."""
    if num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {num_images}")
    ids = np.array(sorted(captions), np.int64)
    if num_images > len(ids):
        logging.warning("the split has %d captioned images, fewer than --num_images=%d: using all of them",
                        len(ids), num_images)
        num_images = len(ids)
    rng = np.random.default_rng(seed)
    chosen = ids[rng.permutation(len(ids))[:num_images]]
    pairs = []
    for image_id in chosen.tolist():
        file, caps = captions[image_id]
        pairs.append(CocoPair(int(image_id), file, caps[int(rng.integers(len(caps)))]))
    return pairs


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{out_dir!r} holds a COCO run with other settings ({', '.join(changed)}): use "
                             "another --out, or the same flags to continue it")
    else:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)


def run_protocol(model_dir: str, coco_dir: str, out_dir: str, *, num_images: int = 30000, split: str = "val2014",
                 seed: int = 0, sampling=None, num_samples: int = 8, num_retrieved: int = 2,
                 features: str = "inception", inception_weights: Optional[str] = None,
                 clip_features_dir: Optional[str] = None, chunk: int = 256, batch_rows: int = 32,
                 data_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Runs the protocol above; returns (and writes to OUT/fid.json) the FID
    with its counts. `sampling`: a SamplingSettings (default: mixed, CFG 3)."""
    from PIL import Image
    from tqdm import tqdm

    from cm3leon_jax.data.images import BadImageError, load_image
    from cm3leon_jax.eval import fid
    from cm3leon_jax.sampling import generate as gen_lib
    from cm3leon_jax.sampling import rerank
    from cm3leon_jax.sampling.sampler import SamplingSettings

    sampling = sampling or SamplingSettings("mixed", cfg_scale=3.0)
    # fail on bad flags before any model is loaded
    extractor_args = dict(clip_dir=clip_features_dir, inception_weights=inception_weights)
    if features == "inception" and not inception_weights:
        raise ValueError("--features=inception needs --inception_weights (pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded), or use --features=clip")
    pairs = select_pairs(load_captions(coco_dir, split), num_images, seed)
    settings = {"model_dir": os.path.abspath(model_dir), "coco_dir": os.path.abspath(coco_dir), "split": split,
                "num_images": len(pairs), "seed": seed, "sampling": dataclasses.asdict(sampling),
                "num_samples": num_samples, "num_retrieved": num_retrieved}
    _check_settings(out_dir, settings)
    with open(os.path.join(out_dir, SELECTION_FILE), "w") as f:
        for p in pairs:
            f.write(json.dumps(dataclasses.asdict(p)) + "\n")

    bundle = gen_lib.load_model(model_dir, data_dir=data_dir)
    import gin

    gin.clear_config()
    g = gen_lib.Generator(bundle)
    res = g.vq.resolution
    real_dir, fake_dir = os.path.join(out_dir, "real"), os.path.join(out_dir, "fake")
    os.makedirs(real_dir, exist_ok=True)
    os.makedirs(fake_dir, exist_ok=True)

    skipped_real = {}
    keep = []
    for p in tqdm(pairs, desc="real images", unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True):
        dst = os.path.join(real_dir, f"{p.image_id:012d}.png")
        if not os.path.isfile(dst):
            try:
                Image.fromarray(load_image(p.file, res)).save(dst + ".tmp.png")
            except BadImageError as e:
                skipped_real[e.reason] = skipped_real.get(e.reason, 0) + 1
                logging.warning("skipping %s", e)
                continue
            os.replace(dst + ".tmp.png", dst)
        keep.append(p)

    todo = [p for p in keep if not os.path.isfile(os.path.join(fake_dir, f"{p.image_id:012d}.png"))]
    have_clip = num_samples > 1
    bar = tqdm(total=len(keep), initial=len(keep) - len(todo), desc="generate", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        # the per-caption seed is the pair's position in the selection: resuming draws the same samples
        for p, (imgs, _, _) in zip(part, _generate(g, part, pairs, sampling, num_samples, seed, num_retrieved,
                                                    batch_rows)):
            best = 0
            if have_clip:
                order, _ = rerank.rerank(g.clip, p.caption, imgs, 1)
                best = int(order[0])
            dst = os.path.join(fake_dir, f"{p.image_id:012d}.png")
            Image.fromarray(imgs[best]).save(dst + ".tmp.png")
            os.replace(dst + ".tmp.png", dst)
            bar.update(1)
    bar.close()

    extractor = fid.make_extractor(features, **extractor_args)
    names = [f"{p.image_id:012d}.png" for p in keep]
    real, _ = fid.directory_features(real_dir, extractor, files=[os.path.join(real_dir, n) for n in names],
                                     progress=progress)
    fake, skipped_fake = fid.directory_features(fake_dir, extractor,
                                                files=[os.path.join(fake_dir, n) for n in names],
                                                progress=progress)
    value = fid.frechet_distance(*fid.feature_statistics(real), *fid.feature_statistics(fake))
    if len(keep) < fid.SMALL_SET_WARNING:
        logging.warning("FID on %d image pairs: below %d FID is biased upwards (the protocol uses 30,000)",
                        len(keep), fid.SMALL_SET_WARNING)
    result = {"fid": value, "features": extractor.name, "num_images": len(keep), "split": split,
              "skipped_real": skipped_real, "skipped_fake": skipped_fake, "model_step": bundle.step,
              "small_set": len(keep) < fid.SMALL_SET_WARNING, **{k: settings[k] for k in (
                  "seed", "num_samples", "num_retrieved", "sampling")}}
    fid.write_json(result, os.path.join(out_dir, RESULT_FILE))
    return result


def _generate(g, part, pairs, sampling, num_samples, seed, num_retrieved, batch_rows):
    """Samples for `part`, caption k of the whole selection seeded seed + k
    (Generator.images_for_prompts seeds prompt i with seed + i: call it per
    contiguous run of the selection)."""
    position = {p.image_id: k for k, p in enumerate(pairs)}
    results, run = [], []

    def flush():
        if run:
            results.extend(g.images_for_prompts([p.caption for p in run], num_samples, sampling,
                                                seed + position[run[0].image_id], num_retrieved,
                                                batch_rows=batch_rows))
            run.clear()

    for p in part:
        if run and position[p.image_id] != position[run[-1].image_id] + 1:
            flush()
        run.append(p)
    flush()
    return results
