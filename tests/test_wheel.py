"""A non-editable install works outside the checkout: wheel -> fresh venv -> demo, train, notebook.

Builds a wheel from a copy of the source tree (so the checkout gets no build/ or egg-info), creates a
fresh virtual environment in a temporary directory, makes the test environment's packages visible to it
through a .pth file (installing jax from PyPI inside a test would take minutes), installs the wheel with
`pip install --no-deps`, and runs everything from a temporary working directory with no PYTHONPATH, so
the checkout is not importable. PyTorch is left out of the packages it sees, as from a user's
`pip install "normistral-jax[demo]"` (the extra does not pull torch's multi-GB CUDA build). Then:
- the package is imported from the new venv (asserted by file location), configs from the package, and
  torch is not importable;
- `normistral demo --steps 20` runs end to end (its bundled corpus and config come from the wheel),
  skipping only its parity step against PyTorch, with a line saying how to enable it;
- `normistral train --config tiny-cpu` (a bundled config named by its name) trains 2 steps;
- the Colab notebook runs, loading the demo's trained export by hub id from a hub cache laid out by hand
  (HF_HUB_OFFLINE=1, temporary HF_HOME).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.hub_cache import make_hub_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "demo-run",
                              ".pytest_cache", ".ruff_cache", ".pytest-groups")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=SKIP, symlinks=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(base / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = list((base / "dist").glob("normistral_jax-*.whl"))
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The test environment's packages (jax, transformers, ...) but torch, as links in one directory added
    # as a fallback path; its .pth files (the editable install of the checkout among them) are not
    # processed from a path added this way.
    shared, packages = base / "shared_site_packages", sysconfig.get_paths()["purelib"]
    shared.mkdir()
    for name in os.listdir(packages):
        if name.split("-")[0].split(".")[0] not in ("torch", "functorch", "torchgen"):
            os.symlink(os.path.join(packages, name), shared / name)
    with open(os.path.join(purelib, "zz_shared_site_packages.pth"), "w") as f:
        f.write(f"{shared}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = base / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_HOME=str(base / "hf_home"),
               PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return {"python": str(python), "bin": env_dir / "bin", "site": purelib, "work": work, "env": env,
            "base": base}


def _run(venv, *argv, timeout=600):
    proc = subprocess.run(list(argv), cwd=venv["work"], env=venv["env"], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


def test_the_package_imports_from_the_venv(venv):
    out = _run(venv, venv["python"], "-c", "import json, jaxmodel, inference, training, normistral, "
               "normistral_configs; from jaxmodel.run_config import find_config; import importlib.util; "
               "assert importlib.util.find_spec('torch') is None, 'torch is importable'; print(json.dumps(["
               "jaxmodel.__file__, inference.__file__, training.__file__, normistral.__file__, "
               "find_config('tiny-cpu')]))")
    paths = json.loads(out.strip().splitlines()[-1])
    for path in paths:
        assert path.startswith(venv["site"]), path
        assert not path.startswith(ROOT), path


def test_demo_train_and_notebook_from_the_wheel(venv):
    demo = venv["work"] / "demo"
    out = _run(venv, str(venv["bin"] / "normistral"), "demo", "--steps", "20", "--workdir", str(demo))
    summary = json.loads((demo / "summary.json").read_text())
    # Without torch the parity step is skipped (tests/test_demo.py runs it, with torch, in the checkout).
    assert summary["final_step"] == 20 and summary["parity_max_abs_logit_diff"] is None
    skipped = "skipped: PyTorch is not installed (the reference runs on it); to enable it: pip install torch"
    assert skipped in out and summary["translations"] == 6, out[-3000:]

    out = _run(venv, str(venv["bin"] / "normistral"), "train", "--config", "tiny-cpu", "--workdir",
               str(venv["work"] / "train"), "--set", "train.steps=2", "--set", "train.eval_every=0")
    assert "finished at step 2" in out

    # The notebook, as a Colab user runs it, with the demo's trained export standing in for the 11B model.
    make_hub_cache(venv["env"]["HF_HOME"], "norallm/normistral-11b-long", str(demo / "run" / "hf"))
    runner = venv["base"] / "notebook_runner.py"
    shutil.copy(os.path.join(ROOT, "tests", "notebook_runner.py"), runner)
    notebook = os.path.join(ROOT, "notebooks", "colab_inference.ipynb")
    result = json.loads(_run(venv, venv["python"], str(runner), notebook).strip().splitlines()[-1])
    assert result["model"] == "norallm/normistral-11b-long"
    assert len(result["translations"]) == len(result["sentences"]) == 4
