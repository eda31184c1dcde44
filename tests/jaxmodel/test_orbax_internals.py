"""The private Orbax names jaxmodel/orbax_stream.py relies on are where it looks for them, and a moved one
fails with a message naming it (orbax_stream's `orbax_internals`, checked against `ORBAX_CHECKED`)."""

from importlib.metadata import version

import pytest

from jaxmodel import orbax_stream
from jaxmodel.orbax_stream import ORBAX_CHECKED, OrbaxInternalsError, orbax_internals


def test_the_private_orbax_names_resolve_in_the_installed_orbax():
    try:
        found = orbax_internals()
    except OrbaxInternalsError as e:
        pytest.fail(str(e))  # names the moved symbol, the installed and the checked version
    assert sorted(vars(found)) == sorted(orbax_stream._PRIVATE)
    assert all(callable(f) for f in vars(found).values())


def test_a_moved_name_is_named_and_nothing_is_written(tmp_path, monkeypatch):
    moved = dict(orbax_stream._PRIVATE, build_array_write_spec=(
        "orbax.checkpoint._src.serialization.tensorstore_utils", "build_array_write_spec_v2"))
    monkeypatch.setattr(orbax_stream, "_PRIVATE", moved)
    orbax_internals.cache_clear()
    try:
        with pytest.raises(OrbaxInternalsError) as e:
            orbax_stream.save_streaming(tmp_path / "out", {}, lambda path, index: None)
    finally:
        monkeypatch.undo()
        orbax_internals.cache_clear()
    assert str(e.value) == (
        f"orbax-checkpoint {version('orbax-checkpoint')}: orbax.checkpoint._src.serialization.tensorstore_utils."
        f"build_array_write_spec_v2 is gone or moved (jaxmodel/orbax_stream.py was checked against "
        f"orbax-checkpoint {ORBAX_CHECKED}); install orbax-checkpoint=={ORBAX_CHECKED} or update orbax_stream._PRIVATE")
    assert list(tmp_path.iterdir()) == []  # refused before any staging directory


def test_a_missing_handler_attribute_is_named(monkeypatch):
    monkeypatch.setattr(orbax_stream, "_HANDLER_ATTRIBUTES", ("_primary_host", "_no_such_attribute"))
    orbax_internals.cache_clear()
    try:
        with pytest.raises(OrbaxInternalsError, match=r"ArrayHandler\(\)\._no_such_attribute is gone or moved"):
            orbax_internals()
    finally:
        monkeypatch.undo()
        orbax_internals.cache_clear()
