"""jaxmodel.storage against a local directory and the GCS emulator: one code path for both."""

import pytest

from jaxmodel import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs_bucket")


def test_files_round_trip_and_listing(root):
    storage.write_json(storage.join(root, "d", "a.json"), {"x": 1})
    storage.write_text(storage.join(root, "d", "b.txt"), "æøå\n")
    assert storage.read_json(storage.join(root, "d", "a.json")) == {"x": 1}
    assert storage.read_text(storage.join(root, "d", "b.txt")) == "æøå\n"
    assert storage.listdir(storage.join(root, "d")) == ["a.json", "b.txt"]
    assert storage.glob(storage.join(root, "d", "*.json")) == [storage.join(root, "d", "a.json")]
    assert storage.isdir(storage.join(root, "d")) and storage.isfile(storage.join(root, "d", "a.json"))
    with storage.open(storage.join(root, "d", "b.txt"), "rb") as f:
        f.seek(2)
        assert f.read(2) == "æøå".encode()[2:4]  # a range read


def test_atomic_directory_commits_only_on_success(root):
    target = storage.join(root, "out")
    with pytest.raises(RuntimeError):
        with storage.atomic_directory(target) as tmp:
            storage.write_text(storage.join(tmp, "part"), "x")
            raise RuntimeError("killed")
    assert not storage.exists(storage.join(target, "part"))
    with storage.atomic_directory(target) as tmp:
        storage.write_text(storage.join(tmp, "part"), "y")
    assert storage.read_text(storage.join(target, "part")) == "y" and storage.is_committed(target)
    with pytest.raises(storage.StorageError, match="already exists and is not empty"):
        storage.check_output_dir(target)


def test_uncommitted_remote_directory_is_refused_and_replaced(gcs_bucket):
    target = storage.join(gcs_bucket, "half")
    storage.write_text(storage.join(target, storage.WRITING), "")  # what a killed writer leaves
    storage.write_text(storage.join(target, "part"), "x")
    with pytest.raises(storage.StorageError, match="uncommitted"):
        storage.check_input_dir(target)
    with storage.atomic_directory(target) as tmp:  # a rerun starts afresh
        storage.write_text(storage.join(tmp, "new"), "y")
    assert storage.listdir(target) == sorted([storage.WRITING, storage.COMMITTED, "new"])
    assert storage.check_input_dir(target) == target


def test_missing_paths_and_buckets_name_the_url(gcs_bucket):
    with pytest.raises(storage.StorageError, match=f"{gcs_bucket}/nothing: no such file"):
        storage.check_input_file(f"{gcs_bucket}/nothing")
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket-x does not exist"):
        storage.check_input_dir("gs://no-such-bucket-x/data")
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket-x does not exist"):
        storage.check_output_file("gs://no-such-bucket-x/out.jsonl")


def test_atomic_file_remote_appears_only_when_complete(gcs_bucket):
    target = storage.join(gcs_bucket, "out.jsonl")
    with pytest.raises(KeyboardInterrupt):
        with storage.atomic_file(target) as f:
            f.write("partial\n")
            raise KeyboardInterrupt
    assert not storage.exists(target)
    with storage.atomic_file(target) as f:
        f.write("whole\n")
    assert storage.read_text(target) == "whole\n"
