"""Predict's input side: files read ahead in threads arrive in order with the same content as
read one by one; files done before are hashed, not decoded."""

from __future__ import annotations

import numpy as np

from artifacts.io import sha256_file
from data.images import write_png
from prediction.inputs import read_ahead


def _images(folder, n):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        path = folder / f"{k}.png"
        write_png(path, rng.random((16 + k, 20)).astype(np.float32))
        paths.append(path)
    (folder / "bad.png").write_text("not an image")
    return [*paths[:3], folder / "bad.png", *paths[3:]]


def test_read_ahead_keeps_order_and_content(tmp_path):
    files = _images(tmp_path, 7)
    one_by_one = list(read_ahead(files, {}, depth=0))
    ahead = list(read_ahead(files, {}, depth=3))
    assert [i.path for i in ahead] == files == [i.path for i in one_by_one]
    for a, b in zip(ahead, one_by_one):
        assert a.sha256 == b.sha256 == sha256_file(a.path)
        assert a.skipped == b.skipped
        if a.image is None:
            assert a.path.name == "bad.png" and "bad.png" not in a.skipped  # reason, not path
        else:
            np.testing.assert_array_equal(a.image, b.image)


def test_files_done_before_are_not_decoded(tmp_path):
    files = _images(tmp_path, 3)
    done = {str(files[1]): sha256_file(files[1]), str(files[2]): "0" * 64}  # [2] has changed
    items = list(read_ahead(files, done, depth=2))
    assert [i.already_done for i in items] == [False, True, False, False]
    assert items[1].image is None and items[2].image is not None
