"""t5x-compatible gin flags: --gin_file, --gin.NAME=VALUE, --gin_bindings,
--gin_search_paths; REQUIRED macros checked before any work; the resolved
config written into model_dir as config.gin."""
from __future__ import annotations

import argparse
import importlib
import os
import re
from typing import Dict, Iterable, List, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules holding the configurables a gin file may bind; imported before
# parsing so that an unknown binding is really unknown.
CONFIGURABLE_MODULES = (
    "cm3leon_jax.vocab",
    "cm3leon_jax.partitioning",
    "cm3leon_jax.models.decoder_config",
    "cm3leon_jax.train.optimizer",
    "cm3leon_jax.train.trainer",
)


class GinConfigError(ValueError):
    """A gin problem, reported as one line naming the file or binding."""


def add_gin_arguments(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("gin (t5x-style)")
    g.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                   help="gin file(s) to parse in order, e.g. gin/cm3leon_tiny.gin")
    g.add_argument("--gin_bindings", action="append", default=[], metavar="BINDING",
                   help="a binding such as \"TRAIN_STEPS = 300\" (repeatable)")
    g.add_argument("--gin_search_paths", default="", metavar="DIRS",
                   help="comma-separated directories where gin files and their includes are "
                        "looked up (the repository root and the cwd are always searched)")
    g.add_argument("--gin.NAME=VALUE", dest="_gin_dot_help", action="store_true",
                   help="shorthand binding, e.g. --gin.TRAIN_STEPS=300 or "
                        "--gin.train.batch_size=16 (repeatable)")


def split_gin_dot_flags(argv: Sequence[str]) -> tuple[List[str], List[str]]:
    """Separates `--gin.NAME=VALUE` flags (t5x's shorthand) from the rest."""
    rest, bindings = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--gin.") and a != "--gin.NAME=VALUE":
            body = a[len("--gin."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise GinConfigError(f"flag {a} has no value; write {a}=VALUE")
                body = f"{body}={argv[i + 1]}"
                i += 1
            name, value = body.split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(a)
        i += 1
    return rest, bindings


def import_configurables(extra: Iterable[str] = ()):
    for m in tuple(CONFIGURABLE_MODULES) + tuple(extra):
        importlib.import_module(m)


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
          extra_modules: Iterable[str] = (), check_required: bool = True):
    """Parses gin files then bindings; raises GinConfigError with one line."""
    import gin

    import_configurables(extra_modules)
    for p in [os.getcwd(), REPO_ROOT, *[s for s in search_paths if s]]:
        gin.add_config_file_search_path(p)
    if not gin_files:
        raise GinConfigError("no --gin_file given; e.g. --gin_file=gin/cm3leon_tiny.gin")
    resolved = [_resolve_file(f, search_paths) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise GinConfigError(_one_line(e)) from None
    if check_required:
        missing = missing_required()
        if missing:
            raise GinConfigError(
                f"gin: {missing[0]} is %gin.REQUIRED and was not set; pass --gin.{missing[0]}=... "
                + ("(or --model_dir=...)" if missing[0] == "MODEL_DIR" else "")
                + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))


def missing_required() -> List[str]:
    """Names of macros and parameters still bound to %gin.REQUIRED."""
    import gin
    from gin import config as gin_config

    missing = []
    for (scope, selector), params in gin_config._CONFIG.items():  # noqa: SLF001 - gin has no public walker
        for name, value in params.items():
            if isinstance(value, gin_config.ConfigurableReference) and \
                    value.configurable.wrapped == gin_config._retrieve_constant:  # noqa: SLF001
                if value.scoped_configurable_fn() is gin.REQUIRED:
                    if selector.endswith("gin.macro") or selector.endswith("macro"):
                        missing.append(scope or selector)
                    else:
                        missing.append(f"{(scope + '/') if scope else ''}{selector}.{name}")
    return sorted(set(missing))


def _resolve_file(f: str, search_paths: Sequence[str]) -> str:
    from cm3leon_jax import paths as paths_lib

    if paths_lib.is_url(f):  # a config.gin in a gs:// model dir: gin reads it with tf.io.gfile
        if not paths_lib.exists(f):
            raise GinConfigError(f"gin file {f!r} not found")
        import gin
        import tensorflow as tf

        gin.config.register_file_reader(tf.io.gfile.GFile, lambda p: paths_lib.is_url(p) and tf.io.gfile.exists(p))
        return f
    if os.path.exists(f):
        return f
    for base in [REPO_ROOT, *search_paths]:
        cand = os.path.join(base, f)
        if os.path.exists(cand):
            return cand
    raise GinConfigError(f"gin file {f!r} not found (searched the cwd, {REPO_ROOT}"
                         + (f", {', '.join(search_paths)}" if search_paths else "") + ")")


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    head = msg[0] if msg else type(e).__name__
    where = next((line.strip() for line in msg[1:] if line.strip().startswith("In ")), "")
    m = re.search(r"No configurable matching '([^']+)'", head)
    if m:
        head = f"gin: unknown configurable or binding {m.group(1)!r}"
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", head)
    if m:
        head = f"gin: unknown binding {m.group(1)}.{m.group(2)} ({m.group(1)} has no parameter {m.group(2)!r})"
    return f"{head}{' (' + where + ')' if where else ''}"


def write_config(model_dir: str, filename: str = "config.gin") -> str:
    """Writes the resolved config (every binding in force) into model_dir."""
    import gin
    import jax

    from cm3leon_jax import paths as paths_lib

    path = os.path.join(model_dir, filename)
    if jax.process_index() == 0:
        paths_lib.makedirs(model_dir)  # a local dir or gs:// (paths.py)
        with paths_lib.open(path, "w", encoding="utf-8") as f:
            f.write(gin.config_str())
    return path


_WRITTEN_BINDING = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$")


def read_written_bindings(config_path: str) -> Dict[str, str]:
    """The bindings of a config.gin that `write_config` wrote
    (`gin.config_str()`), as {name: value text}: e.g. {'TRAIN_STEPS': '9000',
    'train.train_steps': '%TRAIN_STEPS', 'DecoderConfig.d_model': '128'}. A
    value that gin wrapped over several lines (`NAME = \\` and indented
    lines: a long list or dict) is joined back into one line. Raises OSError
    when the file cannot be read; local paths and URLs alike (paths.py)."""
    from cm3leon_jax import paths as paths_lib

    with paths_lib.open(config_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: Dict[str, str] = {}
    name = None
    for line in lines:
        if name is not None and line[:1].isspace() and line.strip():
            # a wrapped value's continuation (gin ends the first line with "\\")
            out[name] = (out[name].rstrip("\\").rstrip() + " " + line.strip()).strip()
            continue
        m = _WRITTEN_BINDING.match(line)
        name = m.group(1) if m else None
        if m:
            out[name] = m.group(2).strip()
    return out


def written_value(bindings: Dict[str, str], name: str):
    """A binding of `read_written_bindings`' result as a Python literal,
    following one macro reference (`train.train_steps = %TRAIN_STEPS`); None
    when absent or not a literal (a configurable reference such as @f())."""
    import ast

    text = bindings.get(name)
    if text is not None and text.startswith("%"):
        text = bindings.get(text[1:])
    if text is None:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def parse_from_args(args: argparse.Namespace, extra_bindings: Sequence[str],
                    extra_modules: Iterable[str] = (), check_required: bool = True):
    search = [s for s in (args.gin_search_paths or "").split(",") if s]
    bindings = list(args.gin_bindings) + list(extra_bindings)
    if getattr(args, "model_dir", None):
        bindings.append(f"MODEL_DIR = {args.model_dir!r}")
    parse(args.gin_file, bindings, search, extra_modules, check_required)


def macro_value(name: str, default=None):
    import gin

    try:
        return gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        return default
