"""Text a user gives `cm3leon generate` (issue 26): a --prompt that is not
UTF-8 (Python holds the undecodable argv bytes as lone surrogates), a
prompts file with a non-UTF-8 line, control characters, blank prompts. Each
is cleaned (control characters) or refused in one line naming the input,
before a model is loaded; never a traceback from deep in a tokenizer. The
fuzz test prints how many examples it tried (pytest -s)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm3leon_jax import cli
from cm3leon_jax.data import text as text_lib
from tests.conftest import run_cli


def test_non_utf8_prompt_and_prompts_file_through_the_cli(tmp_path):
    bad = run_cli(["generate", f"--model_dir={tmp_path / 'nope'}", "--prompt=caf\udce9 au lait",
                   f"--out={tmp_path / 'out'}"], check=False, timeout=120)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --prompt is not valid UTF-8 text"), bad.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\nun caf\xe9\n")
    bad = run_cli(["generate", f"--model_dir={tmp_path / 'nope'}", f"--prompts_file={prompts}",
                   f"--out={tmp_path / 'out'}"], check=False, timeout=120)
    assert bad.returncode == 2 and re.search(r"prompts.txt, line 2: not UTF-8 text \(byte 0xe9", bad.stderr), \
        bad.stderr
    assert not (tmp_path / "out").exists()


def _generate(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, err.getvalue()


def test_fuzz_generate_prompts(record_property):
    """Any --prompt and any prompts file: exit 2 with one line, naming the
    prompt when it is bad, else reaching the (missing) model dir."""
    tried = [0]
    d = tempfile.mkdtemp(prefix="cm3_prompts_")
    model_dir = os.path.join(d, "no_model")

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=30),
           st.one_of(st.none(), st.binary(max_size=60)))
    def run(prompt, file_bytes):
        tried[0] += 1
        argv = ["generate", f"--model_dir={model_dir}", f"--prompt={prompt}", f"--out={d}/out"]
        if file_bytes is not None:
            with open(os.path.join(d, "p.txt"), "wb") as f:
                f.write(file_bytes)
            argv.append(f"--prompts_file={d}/p.txt")
        code, err = _generate(argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        if re.search("[\ud800-\udfff]", prompt):
            assert "--prompt is not valid UTF-8 text" in err
        elif not text_lib.clean_text(prompt).strip():
            assert "--prompt is empty" in err
        elif file_bytes is not None and not _utf8(file_bytes):
            assert "p.txt, line" in err and "not UTF-8 text" in err
        else:
            assert "config.gin" in err  # every prompt accepted: the missing model is next

    try:
        run()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"\nfuzz generate prompts: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
