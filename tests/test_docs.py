"""The documentation's code runs: every ```python block of each page in ``DOCS``, in order, in one namespace (a
fresh Python process per page, its working directory an empty temporary folder), so the pages cannot rot.

Blocks fenced with another language (```python-gpu, ```text, ```bash, ...) are not run: that is how a page marks
code that needs a GPU or a download. A page whose code needs an optional package that is not installed is skipped
(the package is named); any other failure names the page, the block and its first line in the page.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/training-stack.md"]
OPTIONAL = {"peft", "transformers", "accelerate", "bitsandbytes", "safetensors"}  # skip the page if one is missing
TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(text: str):
    """``[(first line number, code)]`` of the blocks fenced exactly as ``python`` (or ``py``), in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, indent = m["fence"], m["info"].strip(), len(m["indent"])
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence at line {i + 1}")
        if info.split(" ")[0].lower() in ("python", "py"):
            blocks.append((i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


# Runs in the child: each block compiled under the page's name and line numbers (tracebacks point into the page);
# reports the failing block's index, then re-raises.
_RUNNER = r"""
import json, sys
path, blocks = sys.argv[1], json.load(open(sys.argv[2]))
ns = {"__name__": "__main__"}
for k, (line, code) in enumerate(blocks):
    try:
        exec(compile("\n" * (line - 1) + code, path, "exec"), ns)
    except BaseException as e:
        print(f"\n@@DOCS_BLOCK_FAILED@@ {k} {line} {type(e).__name__} {getattr(e, 'name', None)}", file=sys.stderr)
        raise
"""


def test_fence_parser():
    text = "x\n```python\na = 1\n```\n```python-gpu\nb = 2\n```\n  ```py\n  c = 3\n  ```\n````text\n```python\n````\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "c = 3\n")]
    with pytest.raises(ValueError, match="unclosed"):
        python_blocks("```python\na = 1\n")


@pytest.mark.parametrize("doc", DOCS)
def test_doc_python_blocks_run(doc, tmp_path):
    path = ROOT / doc
    blocks = python_blocks(path.read_text())
    assert blocks, f"{doc}: no ```python block"
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(_RUNNER)
    work = tmp_path / "cwd"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(path), str(tmp_path / "blocks.json")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode == 0:
        return
    failed = re.search(r"@@DOCS_BLOCK_FAILED@@ (\d+) (\d+) (\w+) (\S+)", proc.stderr)
    if failed and failed[3] in ("ModuleNotFoundError", "ImportError"):
        top = failed[4].split(".")[0]
        if top in OPTIONAL and importlib.util.find_spec(top) is None:
            pytest.skip(f"{doc}: needs {top}, which is not installed")
    where = f"block {int(failed[1]) + 1} of {len(blocks)} (line {failed[2]})" if failed else "before any block"
    pytest.fail(f"{doc}: {where} failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}\n"
                f"--- stderr\n{proc.stderr[-8000:]}", pytrace=False)


def test_readme_is_a_short_guide():
    """The README stays a user guide (performance logs live in docs/): at most 150 lines."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
