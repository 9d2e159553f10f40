"""What the command modules share (cli.py and cm3leon_jax/commands/*): one-line
input errors, resumable jobs, the decoding flags, and running a trainer under
the model dir's writer lock. Nothing here imports cli.py, so the command
modules can import it without a cycle (ARCHITECTURE.md, layer 9)."""
from __future__ import annotations

import json
import sys

from cm3leon_jax import gin_utils


def input_error(e: BaseException) -> int:
    """One line on stderr naming the bad input, exit status 2."""
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_resumable(job, what: str) -> int:
    """Runs `job()` (a resumable job writing `what`: "shards", "chunks") and
    prints its JSON report: exit 0; a bad input is one line on stderr, exit
    2; Ctrl-C keeps what was written and says how to continue, exit 130."""
    try:
        report = job()
    except (ValueError, OSError) as e:
        return input_error(e)
    except KeyboardInterrupt:
        print(f"interrupted: the {what} written so far are kept; rerun the same command to continue",
              file=sys.stderr)
        return 130
    print(json.dumps(report), flush=True)
    return 0


def add_sampling_args(p) -> None:
    """The decoding flags of `generate` and `eval coco`; `sampling_settings`
    turns them into a SamplingSettings."""
    p.add_argument("--decoding", choices=("top_p", "cd_k", "mixed", "greedy"), default="mixed",
                   help="token choice: top_p (temperature + nucleus), cd_k (contrastive, expert = "
                        "conditional, amateur = unconditional stream), mixed (default: sample 1 of each "
                        "prompt CD-K, the others top-p; CD-K is deterministic, so one CD-K sample "
                        "is all it adds), greedy")
    p.add_argument("--cfg_scale", type=float, default=3.0,
                   help="classifier-free guidance scale alpha_c (default 3; 1 turns guidance off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus mass kept (default 0.9)")
    p.add_argument("--top_k", type=int, default=0, help="top-k filter before top-p (default 0: none)")
    p.add_argument("--cd_alpha", type=float, default=0.1,
                   help="CD-K: a token is allowed if p_exp >= alpha * kmax(p_exp) (default 0.1)")
    p.add_argument("--cd_k", type=int, default=1,
                   help="CD-K: the k of kmax, the k-th largest expert probability (default 1; a larger k "
                        "always admits k codes and paints noise where the expert is sure, see "
                        "SamplingSettings)")


def add_model_bundle_args(p) -> None:
    """The flags that override what a model dir's training data names
    (`generate`, `serve`): the VQ-GAN, BPE and CLIP dirs and the task data dir."""
    p.add_argument("--vqgan_dir", default=None, help="override the VQ-GAN of the training data")
    p.add_argument("--text_tokenizer", default=None, help="override the BPE of the training data")
    p.add_argument("--clip_dir", default=None, help="override the CLIP of the training data")
    p.add_argument("--data_dir", default=None, help="a `cm3leon task-data` dir (bank and index for retrieval)")


def sampling_settings(args):
    from cm3leon_jax.sampling.sampler import SamplingSettings

    return SamplingSettings(args.decoding, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            cfg_scale=args.cfg_scale, cd_alpha=args.cd_alpha, cd_k=args.cd_k)


def run_trainer(model_dir: str, train_fn) -> int:
    """Writes config.gin and runs `train_fn()` holding `model_dir`'s writer
    lock, then prints its JSON report: exit 0. Another live writer of the dir,
    or a checkpoint the disk refused, is one line on stderr, exit 1 (the
    checkpoints written before it are kept; a rerun resumes from them)."""
    from cm3leon_jax import model_dir_lock
    from cm3leon_jax import checkpoints

    try:
        with model_dir_lock.hold(model_dir):
            gin_utils.write_config(model_dir)
            result = train_fn()
    except (model_dir_lock.ModelDirLockedError, checkpoints.CheckpointWriteError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)  # without gin's "In call to"
        return 1
    print(json.dumps(result), flush=True)
    return 0
