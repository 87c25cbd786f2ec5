"""The lab's image cache: a stale image left by an interrupted build is removed without reaching
through what the build had bound into it (/proc, /sys, /dev of this machine)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from infra.lab.image import mounts_below, remove_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binding a directory into another needs root")


def test_a_stale_image_is_removed_without_touching_what_was_bound_into_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"  # stands for the machine's /dev
    outside.mkdir()
    (outside / "null").write_text("keep me")
    image = tmp_path / "cache" / "0123456789abcdef"
    (image / "root" / "dev").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(outside), str(image / "root" / "dev")], check=True)
    try:
        assert mounts_below(image) == [image / "root" / "dev"]
        remove_image(image)
    finally:
        subprocess.run(["umount", "-l", str(image / "root" / "dev")], check=False, capture_output=True)
    assert not image.exists()
    assert (outside / "null").read_text() == "keep me"
