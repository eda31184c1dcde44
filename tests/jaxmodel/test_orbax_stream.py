"""save_streaming: plain Orbax restores what it writes, bit for bit, sharded or not; failures leave
nothing behind; peak host memory stays near one slice (measured in subprocesses).

Run as a script (`python test_orbax_stream.py baseline|big DIR`), this file is the child process the
memory test measures.
"""

import json
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxmodel import orbax_stream
from jaxmodel.orbax_stream import num_writes, save_streaming

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SDS = jax.ShapeDtypeStruct


def _tree():
    """Stacked leaves of each dtype under 'layers', unstacked ones (incl. a scalar) elsewhere."""
    return {
        "layers": {
            "attn": {"q_proj": {"kernel": SDS((3, 5, 7), np.float32)}},
            "mlp": {"w": SDS((3, 4, 6), jnp.bfloat16)},
            "norm": {"count": SDS((3, 4), np.int32)},
        },
        "embed": {"embedding": SDS((11, 6), jnp.bfloat16)},
        "lm_head": {"kernel": SDS((6, 11), np.float32)},
        "step": SDS((), np.int32),  # (int64 would come back as int32 without jax x64)
    }


def _value(path, index, shape, dtype):
    """Deterministic data per (path, index); float leaves include NaN/inf/-0 to check bit-exactness."""
    rng = np.random.default_rng([zlib.crc32("/".join(path).encode()), 0 if index is None else index + 1])
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-(2**31), 2**31 - 1, size=shape).astype(dtype)
    x = (rng.standard_normal(shape) * 100).astype(dtype)
    if x.size >= 3:
        x.reshape(-1)[:3] = np.array([np.nan, np.inf, -0.0]).astype(dtype)
    return x


def _expected_and_fill(tree):
    """Returns (path -> full expected array, fill, calls) where calls records every fill call."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    shapes = {tuple(k.key for k in kp): (s.shape, np.dtype(s.dtype)) for kp, s in leaves}
    calls = []

    def fill(path, index):
        calls.append((path, index))
        shape, dtype = shapes[path]
        return _value(path, index, shape if index is None else shape[1:], dtype)

    expected = {}
    for path, (shape, dtype) in shapes.items():
        if "layers" in path:
            expected[path] = np.stack([_value(path, i, shape[1:], dtype) for i in range(shape[0])])
        else:
            expected[path] = _value(path, None, shape, dtype)
    return expected, fill, calls


def _assert_bits(restored, expected):
    flat = {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(restored)}
    assert sorted(flat) == sorted(expected)
    for path, want in expected.items():
        got = np.asarray(flat[path])
        assert isinstance(flat[path], jax.Array), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the target-less restores below
def test_roundtrip_is_bit_exact_with_plain_orbax(tmp_path):
    tree = _tree()
    expected, fill, calls = _expected_and_fill(tree)
    ticks = []
    save_streaming(tmp_path / "ckpt", tree, fill, progress=ticks.append)

    # fill: once per layer for stacked leaves, once with None otherwise; progress: once per write.
    assert sorted(calls, key=str) == sorted(
        [(p, i) for p, a in expected.items() if "layers" in p for i in range(a.shape[0])]
        + [(p, None) for p in expected if "layers" not in p], key=str)
    assert ticks == [1] * num_writes(tree) == [1] * len(calls)
    # Only the checkpoint is left: no staging or Orbax temporary directory.
    assert os.listdir(tmp_path) == ["ckpt"]

    device = SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: SDS(s.shape, s.dtype, sharding=device), tree)
    _assert_bits(ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target), expected)
    _assert_bits(ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt"), expected)
    _assert_bits(ocp.StandardCheckpointer().restore(tmp_path / "ckpt"), expected)  # from the _sharding file

    # Orbax reads its metadata back as a tree of jax.Array metadata.
    meta = ocp.StandardCheckpointer().metadata(tmp_path / "ckpt").item_metadata
    assert meta["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 5, 7)
    assert meta["embed"]["embedding"].dtype == jnp.bfloat16


def test_sharded_restore_reads_layer_aligned_chunks(tmp_path, monkeypatch):
    assert len(jax.devices()) >= 2, "tests/conftest.py sets jax_num_cpu_devices=8"
    # A tiny chunk cap so that these small arrays are split the way 5 GB ones are by the default.
    monkeypatch.setattr(orbax_stream, "CHUNK_BYTE_SIZE", 4096)
    tree = {"layers": {"mlp": {"w": SDS((3, 32, 64), jnp.bfloat16)}, "b": {"w": SDS((3, 64, 32), np.float32)}},
            "embed": {"embedding": SDS((64, 48), np.float32)}}
    expected, fill, _ = _expected_and_fill(tree)
    save_streaming(tmp_path / "ckpt", tree, fill)

    with open(tmp_path / "ckpt" / "array_metadatas" / "process_0") as f:
        chunks = {m["array_metadata"]["param_name"]: m["array_metadata"]["chunk_shape"]
                  for m in json.load(f)["array_metadatas"]}
    for name, leaf in [("layers.mlp.w", tree["layers"]["mlp"]["w"]), ("layers.b.w", tree["layers"]["b"]["w"]),
                       ("embed.embedding", tree["embed"]["embedding"])]:
        chunk = chunks[name]
        assert np.prod(chunk) * np.dtype(leaf.dtype).itemsize <= 4096, (name, chunk)
        if name.startswith("layers"):
            assert chunk[0] == 1, (name, chunk)  # a chunk never spans two layers

    mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
    specs = {"layers": {"mlp": {"w": P(None, "fsdp", None)}, "b": {"w": P(None, None, "fsdp")}},
             "embed": {"embedding": P("fsdp", None)}}
    target = jax.tree.map(lambda s, spec: SDS(s.shape, s.dtype, sharding=NamedSharding(mesh, spec)), tree, specs)
    restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)
    _assert_bits(restored, expected)
    for (kp, arr), want_sharding in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(target)):
        assert arr.sharding == want_sharding.sharding
        want = expected[tuple(k.key for k in kp)]
        for shard in arr.addressable_shards:
            assert shard.data.shape == want[shard.index].shape != want.shape
            assert np.asarray(shard.data).tobytes() == want[shard.index].tobytes()


def test_existing_directory_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    tree = {"w": SDS((2,), np.float32)}
    with pytest.raises(FileExistsError):
        save_streaming(tmp_path / "ckpt", tree, lambda p, i: np.zeros(2, np.float32))
    assert os.listdir(tmp_path) == ["ckpt"] and not os.listdir(tmp_path / "ckpt")


def test_failing_fill_leaves_nothing_behind(tmp_path):
    tree = _tree()
    _, good_fill, _ = _expected_and_fill(tree)

    def fill(path, index):
        if index == 2:
            raise RuntimeError("source tensor unreadable")
        return good_fill(path, index)

    with pytest.raises(RuntimeError, match="source tensor unreadable"):
        save_streaming(tmp_path / "ckpt", tree, fill)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_fill_must_return_the_declared_shape_and_dtype(tmp_path, bad):
    tree = {"layers": {"w": SDS((2, 3, 4), jnp.bfloat16)}}
    wrong = np.zeros((3, 5), jnp.bfloat16) if bad == "shape" else np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"fill\(\('layers', 'w'\), 0\) returned"):
        save_streaming(tmp_path / "ckpt", tree, lambda p, i: wrong)
    assert os.listdir(tmp_path) == []


def test_abstract_tree_is_validated(tmp_path):
    with pytest.raises(TypeError, match="ShapeDtypeStruct"):
        save_streaming(tmp_path / "a", {"w": np.zeros(2)}, lambda p, i: None)
    with pytest.raises(TypeError, match="str keys"):
        save_streaming(tmp_path / "b", {"w": [SDS((2,), np.float32)]}, lambda p, i: None)
    assert os.listdir(tmp_path) == []


# -- memory -------------------------------------------------------------------------------------------------------

BIG_SHAPE = (16, 1024, 4096)  # float32: 16 MiB per slice, 256 MiB in all
MEMORY_LIMIT_MIB = 128


def _child(mode, directory):
    """Subprocess body. Both modes import everything and do a tiny save (so thread pools and code paths are
    warm in both); 'big' then streams BIG_SHAPE. Prints the peak RSS (KiB on Linux) as JSON."""
    save_streaming(os.path.join(directory, "small"), {"layers": {"w": SDS((2, 4, 4), np.float32)}},
                   lambda path, index: np.zeros((4, 4), np.float32))
    if mode == "big":
        def fill(path, index):  # each slice is a fresh 16 MiB array of incompressible data
            return np.random.default_rng(index).standard_normal(BIG_SHAPE[1:], dtype=np.float32)

        save_streaming(os.path.join(directory, "big"), {"layers": {"w": SDS(BIG_SHAPE, np.float32)}}, fill)
    # VmHWM, not ru_maxrss: ru_maxrss keeps the RSS the forked child had before exec (the pytest
    # parent's), which would hide the difference between the two children.
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    if mode == "big":  # after measuring: the restore itself needs the full 256 MiB
        restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "big"))["layers"]["w"]
        assert np.array_equal(np.asarray(restored[5]), fill(("layers", "w"), 5))
    print(json.dumps({"mode": mode, "maxrss_kib": peak_kib}))


def test_peak_memory_is_about_one_slice(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    procs = {mode: subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, str(tmp_path / mode)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for mode in ("baseline", "big")}
    peak = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{mode} child failed:\n{err[-3000:]}"
        peak[mode] = json.loads(out.strip().splitlines()[-1])["maxrss_kib"] / 1024
    increase = peak["big"] - peak["baseline"]
    full_mib = np.prod(BIG_SHAPE) * 4 / 2**20
    print(f"\npeak RSS: baseline {peak['baseline']:.0f} MiB, big {peak['big']:.0f} MiB, "
          f"increase {increase:.0f} MiB (array {full_mib:.0f} MiB, slice {full_mib / BIG_SHAPE[0]:.0f} MiB)")
    assert increase < MEMORY_LIMIT_MIB, peak


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
