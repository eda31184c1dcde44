"""Sliced loading of Hugging Face directories: each process reads only its devices' slices.

References are independent of the code under test: whole-tensor reads (`HFTensor.to_jax` of the full
tensor, then NumPy indexing), a single-process load, and the safetensors headers' byte counts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxmodel import safetensors_io
from jaxmodel.config import MistralConfig
from jaxmodel.convert import flat_arrays, from_pretrained
from jaxmodel.safetensors_io import WeightFiles
from jaxmodel.sharding import make_mesh
from jaxmodel.weights import expected_hf_tensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = [(1, 8, 1), (1, 2, 4), (2, 2, 2), (1, 1, 8), (1, 4, 2)]


def _tensor_bytes(path: str) -> dict[str, int]:
    files = WeightFiles.open(path)
    return {n: int(np.prod(files.shape(n), dtype=np.int64)) * files.dtype(n).itemsize for n in files.names()}


def test_box_reads_match_whole_tensor_reads_for_every_layout(hf_checkpoints):
    """Random boxes of each tensor's JAX layout, including ones that need the widened (non-contiguous)
    cover, against the whole tensor converted and then indexed."""
    path = hf_checkpoints["normistral_gqa"]
    config = MistralConfig.from_hf(path)
    files = WeightFiles.open(path)
    rng = np.random.default_rng(0)
    for name, t in expected_hf_tensors(config).items():
        whole = t.to_jax(files.get(name))
        for _ in range(6):
            box = []
            for n in t.jax_shape:
                a = int(rng.integers(0, n))
                box.append((a, int(rng.integers(a + 1, n + 1))))
            got = t.read_box(lambda index, name=name: files.get_slice(name, index), tuple(box))
            assert np.array_equal(got, whole[tuple(slice(a, b) for a, b in box)]), (name, box)
    files.close()


@pytest.mark.parametrize("shape", MESHES)
def test_a_sharded_load_equals_the_single_device_load_and_reads_each_byte_once(hf_checkpoints, shape):
    path = hf_checkpoints["normistral_gqa"]
    reference = flat_arrays(from_pretrained(path, progress=False))
    before = safetensors_io.bytes_read()
    sharded = flat_arrays(from_pretrained(path, progress=False, mesh=make_mesh(shape)))
    # One process holds every device, so it reads every tensor once, as sliced reads of the regions.
    assert safetensors_io.bytes_read() - before == sum(_tensor_bytes(path).values())
    for key, value in reference.items():
        assert sharded[key].sharding.mesh.devices.size == 8
        assert np.array_equal(np.asarray(sharded[key]), np.asarray(value)), key


PROBE = """
import json, sys
import numpy as np
import jax
from jax.experimental import multihost_utils
from jaxmodel.distributed import DistributedArgs, initialize
initialize(DistributedArgs(sys.argv[1], 2, int(sys.argv[2])))
from jaxmodel import safetensors_io
from jaxmodel.convert import flat_arrays, from_pretrained
from jaxmodel.sharding import make_mesh
arrays = flat_arrays(from_pretrained(sys.argv[3], mesh=make_mesh((1, -1, 1)), progress=False))
read = safetensors_io.bytes_read()
gathered = {".".join(k): np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in sorted(arrays.items())}
if jax.process_index() == 0:
    np.savez(sys.argv[4], **gathered)
print(json.dumps({"index": jax.process_index(), "devices": jax.device_count(), "bytes_read": read,
                  "replicated": sorted(".".join(k) for k, v in arrays.items() if v.sharding.is_fully_replicated)}),
      flush=True)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_each_read_their_half_and_load_the_same_model(hf_checkpoints, tmp_path):
    """2 processes x 4 CPU devices, one FSDP mesh of 8 over both (gloo): the gathered parameters equal the
    single-process load bit for bit, and each process read half of every sharded tensor (plus all of the
    replicated ones, which both must read)."""
    path = hf_checkpoints["normistral_gqa"]
    out = str(tmp_path / "gathered.npz")
    port = _port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, f"localhost:{port}", str(pid), path, out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for pid in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    reports = [json.loads([line for line in o.splitlines() if line.startswith("{")][-1]) for o, _ in outs]
    assert [r["index"] for r in reports] == [0, 1] and all(r["devices"] == 8 for r in reports)

    gathered = np.load(out)
    reference = flat_arrays(from_pretrained(path, progress=False))
    assert sorted(gathered.files) == sorted(".".join(k) for k in reference)
    for key, value in reference.items():
        assert np.array_equal(gathered[".".join(key)], np.asarray(value)), key

    # Bytes: from the safetensors headers, split into the tensors of replicated and of sharded parameters.
    config = MistralConfig.from_hf(path)
    sizes = _tensor_bytes(path)
    replicated_params = set(reports[0]["replicated"])
    assert replicated_params == set(reports[1]["replicated"])
    assert replicated_params == {"layers.input_layernorm.weight", "layers.post_attention_layernorm.weight",
                                 "norm.weight"}  # the norms: no sharded logical axis
    replicated = sum(sizes[n] for n, t in expected_hf_tensors(config).items()
                     if ".".join(t.rule.path) in replicated_params)
    total = sum(sizes.values())
    sharded = total - replicated
    for r in reports:
        assert r["bytes_read"] == replicated + sharded // 2, (r["bytes_read"], replicated, sharded)
        assert r["bytes_read"] < 0.55 * total
    assert sum(r["bytes_read"] for r in reports) == total + replicated



def test_sliced_reads_from_gcs_fetch_only_the_box(hf_bf16_checkpoint, gcs_bucket):
    """On gs:// a column slice is one range request per row (all in flight together): the same values as
    the whole tensor indexed, and exactly the box's bytes requested."""
    from jaxmodel import storage

    remote = f"{gcs_bucket}/sliced/hf"
    storage.copy_dir(hf_bf16_checkpoint, remote)
    files, local = WeightFiles.open(remote), WeightFiles.open(hf_bf16_checkpoint)
    rng = np.random.default_rng(1)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.norm.weight"):
        shape, item = files.shape(name), files.dtype(name).itemsize
        for _ in range(2):
            box = []
            for k, n in enumerate(shape):  # at most 40 rows: each row segment is a request to the emulator
                a = int(rng.integers(0, n))
                box.append(slice(a, int(rng.integers(a + 1, min(n, a + 40) + 1 if k == 0 and len(shape) == 2
                                                       else n + 1))))
            before = safetensors_io.bytes_read()
            got = files.get_slice(name, tuple(box))
            assert safetensors_io.bytes_read() - before == got.size * item
            want = local.get(name)[tuple(box)]  # bfloat16: compared as bytes
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), (name, box)
    files.close(), local.close()
