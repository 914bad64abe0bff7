"""CIFAR-10 files: official layout round-trip, MD5 checks, every bad file named, downloads that fail."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision

from distrain.data import cifar10
from distrain.data.cifar10 import (CIFAR10_FILES, CLASSES, MEAN, STD, download_cifar10, ensure_cifar10,
                                   load_cifar10, md5sum)
from distrain.errors import UserError
from fakes import read_fake_batch, write_fake_cifar10

ALL_FILES = [*cifar10.TRAIN_FILES, *cifar10.TEST_FILES, cifar10.META_FILE]


def _expected(folder: Path, names) -> tuple[np.ndarray, np.ndarray]:
    batches = [read_fake_batch(folder / n) for n in names]
    data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    return data, labels


def _split_of(name: str) -> bool:
    return name != "test_batch"  # meta is read by both splits; train is enough


# -- constants ------------------------------------------------------------------------------------

def test_md5_constants_match_torchvision() -> None:
    tv = torchvision.datasets.CIFAR10
    expected = {name: md5 for name, md5 in [*tv.train_list, *tv.test_list]}
    expected[tv.meta["filename"]] = tv.meta["md5"]
    assert CIFAR10_FILES == expected
    assert cifar10.BASE_FOLDER == tv.base_folder
    assert cifar10.URL == tv.url


def test_class_names_and_statistics() -> None:
    assert CLASSES == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert MEAN == (0.4914, 0.4822, 0.4465)
    assert STD == (0.2470, 0.2435, 0.2616)


# -- round trip -----------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_fake_round_trip(tmp_path, train: bool) -> None:
    folder = write_fake_cifar10(tmp_path, n_train=500, n_test=100)
    x, y, classes = load_cifar10(str(tmp_path), train=train, verify=False)
    n = 500 if train else 100
    assert x.shape == (n, 3, 32, 32) and x.dtype == np.uint8
    assert x.flags.c_contiguous and x.flags.writeable
    assert y.shape == (n,) and y.dtype == np.int64
    assert classes == CLASSES
    ex, ey = _expected(folder, cifar10.split_files(train))
    np.testing.assert_array_equal(x, ex)  # file order kept, batches in order 1..5
    np.testing.assert_array_equal(y, ey)
    assert set(np.unique(y)) == set(range(10))


def test_matches_torchvision_reader(tmp_path, monkeypatch) -> None:
    # torchvision reads the fakes the same way, proof that they are in the official format.
    write_fake_cifar10(tmp_path, n_train=50, n_test=20)
    import torchvision.datasets.cifar as tv_cifar

    # The fakes' MD5 sums are not the official ones; everything else is torchvision's own reader.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    for train in (True, False):
        tv = torchvision.datasets.CIFAR10(str(tmp_path), train=train, download=False)
        x, y, classes = load_cifar10(str(tmp_path), train=train, verify=False)
        np.testing.assert_array_equal(x.transpose(0, 2, 3, 1), tv.data)
        assert y.tolist() == tv.targets
        assert classes == tv.classes


def test_uneven_batches(tmp_path) -> None:
    write_fake_cifar10(tmp_path, n_train=23, n_test=7)
    x, y, _ = load_cifar10(str(tmp_path), train=True, verify=False)
    assert x.shape == (23, 3, 32, 32) and y.shape == (23,)


@pytest.mark.parametrize("max_samples", [1, 99, 100, 150, 499, 500, 10_000])
def test_max_samples_keeps_the_first_images(tmp_path, max_samples: int) -> None:
    write_fake_cifar10(tmp_path, n_train=500, n_test=100)
    full_x, full_y, _ = load_cifar10(str(tmp_path), train=True, verify=False)
    x, y, _ = load_cifar10(str(tmp_path), train=True, verify=False, max_samples=max_samples)
    n = min(max_samples, 500)
    assert x.shape == (n, 3, 32, 32) and x.flags.c_contiguous
    np.testing.assert_array_equal(x, full_x[:n])
    np.testing.assert_array_equal(y, full_y[:n])


@pytest.mark.parametrize("bad", [0, -3])
def test_max_samples_must_be_positive(tmp_path, bad: int) -> None:
    write_fake_cifar10(tmp_path)
    with pytest.raises(UserError, match="max_samples"):
        load_cifar10(str(tmp_path), train=True, verify=False, max_samples=bad)


def test_class_names_come_from_meta(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    names = [f"thing{i}" for i in range(10)]
    meta = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 2, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    assert load_cifar10(str(tmp_path), train=False, verify=False)[2] == names
    (folder / "batches.meta").unlink()
    assert load_cifar10(str(tmp_path), train=False, verify=False)[2] == CLASSES


def test_str_keys_are_accepted(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path, n_train=10, n_test=10)
    d = read_fake_batch(folder / "test_batch")
    (folder / "test_batch").write_bytes(pickle.dumps({k.decode(): v for k, v in d.items()}, protocol=4))
    x, y, _ = load_cifar10(str(tmp_path), train=False, verify=False)
    np.testing.assert_array_equal(y, d[b"labels"])


# -- verification ---------------------------------------------------------------------------------

def test_verify_rejects_fake_contents(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path)
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path), train=True, verify=True)
    msg = str(e.value)
    assert str(folder / "data_batch_1") in msg
    assert CIFAR10_FILES["data_batch_1"] in msg and md5sum(str(folder / "data_batch_1")) in msg
    assert "data.verify=false" in msg


def test_verify_accepts_matching_sums(tmp_path, monkeypatch) -> None:
    folder = write_fake_cifar10(tmp_path)
    for name in ALL_FILES:
        monkeypatch.setitem(CIFAR10_FILES, name, md5sum(str(folder / name)))
    x, _, _ = load_cifar10(str(tmp_path), train=True, verify=True)
    assert len(x) == 500


def test_verify_checks_meta(tmp_path, monkeypatch) -> None:
    folder = write_fake_cifar10(tmp_path)
    monkeypatch.setitem(CIFAR10_FILES, "test_batch", md5sum(str(folder / "test_batch")))
    with pytest.raises(UserError, match="batches.meta"):
        load_cifar10(str(tmp_path), train=False, verify=True)


def test_md5sum_matches_hashlib(tmp_path) -> None:
    import hashlib

    p = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # crosses chunk boundaries
    p.write_bytes(data)
    assert md5sum(str(p)) == hashlib.md5(data).hexdigest()


# -- bad files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*cifar10.TRAIN_FILES, *cifar10.TEST_FILES])
def test_missing_batch_file_is_named(tmp_path, name: str) -> None:
    folder = write_fake_cifar10(tmp_path)
    (folder / name).unlink()
    with pytest.raises(UserError, match="missing") as e:
        load_cifar10(str(tmp_path), train=_split_of(name), verify=False, max_samples=5)
    assert str(folder / name) in str(e.value)
    assert "data.download=true" in str(e.value)


@pytest.mark.parametrize("name", ALL_FILES)
def test_truncated_file_is_named(tmp_path, name: str) -> None:
    folder = write_fake_cifar10(tmp_path)
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path), train=_split_of(name), verify=False)
    assert str(folder / name) in str(e.value)


@pytest.mark.parametrize("name", ALL_FILES)
def test_garbage_file_is_named(tmp_path, name: str) -> None:
    folder = write_fake_cifar10(tmp_path)
    (folder / name).write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path), train=_split_of(name), verify=False)
    assert str(folder / name) in str(e.value)


def test_empty_file_is_named(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"")
    with pytest.raises(UserError, match="test_batch"):
        load_cifar10(str(tmp_path), train=False, verify=False)


def _good_batch(n: int = 4) -> dict:
    return {b"batch_label": b"x", b"labels": [1] * n, b"data": np.zeros((n, 3072), np.uint8), b"filenames": [b"f"] * n}


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.pop(b"data"), "b'data'"),
        (lambda d: d.pop(b"labels"), "b'labels'"),
        (lambda d: d.__setitem__(b"data", np.zeros((4, 3072), np.float32)), "uint8"),
        (lambda d: d.__setitem__(b"data", np.zeros((4, 1024), np.uint8)), "3072"),
        (lambda d: d.__setitem__(b"data", np.zeros((4, 3, 32, 32), np.uint8)), "3072"),
        (lambda d: d.__setitem__(b"data", [1, 2, 3]), "uint8"),
        (lambda d: d.__setitem__(b"labels", [1, 2, 3]), "4 images but 3 labels"),
        (lambda d: d.__setitem__(b"labels", [0, 1, 2, 10]), "0..9"),
        (lambda d: d.__setitem__(b"labels", [0, -1, 2, 3]), "0..9"),
        (lambda d: d.__setitem__(b"labels", ["a", "b", "c", "d"]), "integers"),
    ],
)
def test_wrong_structure_is_named_even_without_verify(tmp_path, change, words: str) -> None:
    folder = write_fake_cifar10(tmp_path)
    d = _good_batch()
    change(d)
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path), train=False, verify=False)
    assert str(folder / "test_batch") in str(e.value)
    assert words in str(e.value)


def test_not_a_dict_is_named(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(UserError, match="data_batch_3"):
        load_cifar10(str(tmp_path), train=True, verify=False)


def test_bad_meta_is_named(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    with pytest.raises(UserError, match="batches.meta"):
        load_cifar10(str(tmp_path), train=True, verify=False)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path)
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = {b"data": Payload(), b"labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    for verify in (False, True):
        with pytest.raises(UserError) as e:
            load_cifar10(str(tmp_path), train=True, verify=verify)
        assert str(folder / "data_batch_1") in str(e.value)
    assert "system" in str(e.value) or "MD5" in str(e.value)
    assert not marker.exists()


# -- missing folder and downloads -----------------------------------------------------------------

def test_missing_folder_without_download(tmp_path) -> None:
    with pytest.raises(UserError) as e:
        ensure_cifar10(str(tmp_path), download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data.download=true" in msg
    with pytest.raises(UserError, match="data.download=true"):
        load_cifar10(str(tmp_path), train=True)


def test_root_pointing_at_batches_folder_gets_a_hint(tmp_path) -> None:
    folder = write_fake_cifar10(tmp_path)
    with pytest.raises(UserError, match="parent folder"):
        load_cifar10(str(folder), train=True, verify=False)


def test_ensure_with_all_files_does_not_download(tmp_path, monkeypatch) -> None:
    write_fake_cifar10(tmp_path)

    def boom(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", boom)
    ensure_cifar10(str(tmp_path), download=True)
    ensure_cifar10(str(tmp_path), download=False)


@pytest.mark.parametrize("name", ALL_FILES)
def test_ensure_names_each_missing_file(tmp_path, name: str) -> None:
    folder = write_fake_cifar10(tmp_path)
    (folder / name).unlink()
    with pytest.raises(UserError, match="data.download=true") as e:
        ensure_cifar10(str(tmp_path), download=False)
    assert str(folder / name) in str(e.value)


def test_ensure_downloads_with_torchvision(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, train, download))
        write_fake_cifar10(root, n_train=20, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    ensure_cifar10(str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True, True)]
    assert load_cifar10(str(tmp_path), train=False, verify=False)[0].shape == (10, 3, 32, 32)


@pytest.mark.parametrize(
    "error",
    [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), OSError(28, "No space left on device"),
     RuntimeError("File not found or corrupted."), TimeoutError("timed out")],
)
def test_download_failure_is_a_user_error(tmp_path, monkeypatch, error: Exception) -> None:
    def failing(*a, **k):
        raise error

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", failing)
    for call in (lambda: ensure_cifar10(str(tmp_path), download=True), lambda: download_cifar10(str(tmp_path))):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "download" in msg and "failed" in msg
        assert torchvision.datasets.CIFAR10 is failing and cifar10.URL in msg
        assert "cifar-10-batches-py" in msg
        assert e.value.__cause__ is error


def test_download_that_leaves_no_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: None)
    with pytest.raises(UserError, match="download finished but"):
        download_cifar10(str(tmp_path))
