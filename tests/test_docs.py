"""The documentation works as written: the shell blocks marked runnable in README.md and docs/*.md run and
exit 0, and every relative link in them and in BENCHMARKS.md points to an existing file and heading.

Marking a block runnable: open its fence with ```` ```bash runnable ```` (GitHub highlights it as bash and
ignores the second word). Each page's runnable blocks run in order, each as `bash -euo pipefail`, from the
repository root (configs/ and tests/inference/eval_tasks are named relative to it), with:

  MODEL    a tiny NorMistral-shaped Hugging Face checkpoint with its tokenizer (2 layers, hidden 128, a
           ~400-token byte-level BPE vocabulary, context 512, float32), made once per session
  WORKDIR  an empty directory for the page; its blocks share it, so a block may use an earlier one's output
  PORT     a free TCP port on 127.0.0.1 (for `normistral serve`)
  PATH     this interpreter's bin directory first, so `normistral` is this checkout's

and the persistent compilation cache off (NORMISTRAL_COMPILE_CACHE=0, as in every test). A block has
BLOCK_TIMEOUT seconds; its whole process group is killed afterwards, so a server a block started in the
background never outlives it. Blocks keep their shapes small (a few steps, short `--max-model-len`,
`--prefill-chunk 16`) so that the whole file runs in about two minutes on an idle 2-core CPU.

Anchors follow GitHub's rule: the heading in lower case, punctuation other than `-` and `_` dropped,
spaces turned into `-`, a repeated heading suffixed `-1`, `-2`, ...
"""

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.inference.conftest import tiny_dir  # noqa: F401 (a session fixture: the tiny model with its tokenizer)
from tests.multihost import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
PAGES = [os.path.join(REPO, "README.md"), os.path.join(REPO, "BENCHMARKS.md"),
         *sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))]
BLOCK_TIMEOUT = 300
# The pages of the jobs a user runs: each must show at least one command that this file runs.
JOB_PAGES = ["convert.md", "data.md", "train.md", "generate.md", "serve.md", "eval.md", "compile-check.md"]
FENCE = re.compile(r"^(```+|~~~+)(.*)$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def split_page(path: str):
    """(prose lines with their numbers, [(first line number, info string, block text)]) of one page."""
    prose, blocks, block = [], [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fence = FENCE.match(line.rstrip("\n"))
            if block is None and fence:
                block = (number, fence.group(2).strip(), fence.group(1), [])
            elif block is not None and fence and fence.group(1) == block[2] and not fence.group(2).strip():
                blocks.append((block[0], block[1], "".join(block[3])))
                block = None
            elif block is not None:
                block[3].append(line)
            else:
                prose.append((number, line))
    assert block is None, f"{_rel(path)}:{block[0]}: a code block that is never closed"
    return prose, blocks


def runnable_blocks(path: str) -> list:
    return [(number, text) for number, info, text in split_page(path)[1] if info.split() == ["bash", "runnable"]]


def slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set:
    found, seen = set(), {}
    for _, line in split_page(path)[0]:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in PAGES:
        for number, line in split_page(page)[0]:
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                    continue
                file_part, _, anchor = target.partition("#")
                dest = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
                where = f"{_rel(page)}:{number}: {target}"
                if not os.path.exists(dest):
                    broken.append(f"{where}: no file {_rel(dest)}")
                elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                    broken.append(f"{where}: no heading #{anchor} in {_rel(dest)}")
    assert not broken, "\n".join(broken)


def test_every_job_page_shows_a_runnable_block():
    missing = [name for name in JOB_PAGES if not runnable_blocks(os.path.join(DOCS, name))]
    assert not missing, f"job pages without a ```bash runnable block: {missing}"


def test_the_link_and_block_checks_see_what_they_check(tmp_path):
    """The checks above are only as good as the parsing: a planted broken link, a planted anchor and a
    planted runnable block are found."""
    page = tmp_path / "page.md"
    page.write_text("# A `page`: one\n\n## Usage, briefly\n\n```bash runnable\ntrue\n```\n\n```bash\n# not a heading\n"
                    "```\n\n[x](other.md) [y](#usage-briefly)\n", encoding="utf-8")
    assert anchors(str(page)) == {"a-page-one", "usage-briefly"}
    assert runnable_blocks(str(page)) == [(5, "true\n")]
    assert LINK.findall(split_page(str(page))[0][-1][1]) == ["other.md", "#usage-briefly"]


@pytest.fixture(scope="session")
def doc_model(tiny_dir):  # noqa: F811
    """The tiny checkpoint the blocks see as $MODEL: the inference tests' (tests/inference/conftest.py)."""
    return tiny_dir


def _run_block(text: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", text], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(block killed after {BLOCK_TIMEOUT} s)"
    finally:
        try:  # whatever the block left running in the background (a server) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


RUNNABLE_PAGES = [p for p in PAGES if runnable_blocks(p)]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[_rel(p) for p in RUNNABLE_PAGES])
def test_runnable_blocks_exit_0(page, doc_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # the CLI sets them
    env.update(MODEL=doc_model, WORKDIR=str(tmp_path), PORT=str(free_port()), NORMISTRAL_COMPILE_CACHE="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    for number, text in runnable_blocks(page):
        proc = _run_block(text, env)
        assert proc.returncode == 0, f"{_rel(page)}:{number} exited {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{_rel(page)}:{number}\n{proc.stderr[-3000:]}"
