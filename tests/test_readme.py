"""Every Python block in README.md runs as it is written (what a block leaves to the reader
comes from tests/readme_preludes.py). Blocks run in order, each in a fresh process, in one
working directory, so a block may read what an earlier one saved."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from readme_preludes import CHECKS, PRELUDES

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<directive>[^>]*?) -->\n)?```python\n(?P<code>.*?)```",
                   re.S)


def _blocks() -> list:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        options = dict(item.split("=", 1) for item in (match["directive"] or "").split())
        found.append(pytest.param(match["code"], options, id=f"README-line-{line}"))
    return found


BLOCKS = _blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize(("code", "options"), BLOCKS)
def test_readme_block_runs(code, options, workdir):
    prelude = options.get("prelude")
    assert prelude is None or prelude in PRELUDES, f"unknown prelude {prelude!r}"
    script = workdir / f"block_{abs(hash(code)) % 10**8}.py"
    script.write_text((PRELUDES.get(prelude, "") + "\n" + code + "\n"
                       + CHECKS.get(prelude, "")), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(script)]
    if "torchrun" in options:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={options['torchrun']}", str(script)]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
