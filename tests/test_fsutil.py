"""fsutil.atomic_file: the target appears whole or not at all."""

import pytest

from splitq_jax.fsutil import atomic_file


def test_atomic_file_replaces_on_success_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "sub" / "x.json"
    with atomic_file(target) as tmp:
        assert not target.exists()
        tmp.write_text("one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert target.read_text() == "one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]
