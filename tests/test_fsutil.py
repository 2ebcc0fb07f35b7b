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


def test_sha256_file_and_write_json(tmp_path):
    import hashlib
    import json

    from splitq_jax.fsutil import sha256_file, write_json

    data = bytes(range(256)) * 5000  # more than one 1 MiB chunk
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    write_json(tmp_path / "sub" / "r.json", [{"a": 1.5}])
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == [{"a": 1.5}]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json"]  # no temp file left
