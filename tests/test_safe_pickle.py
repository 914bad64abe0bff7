"""The restricted unpickler reads CIFAR-style pickles and never resolves anything that runs code."""

from __future__ import annotations

import io
import os
import pickle
import sys

import numpy as np
import pytest

from distrain.data.safe_pickle import safe_load, safe_loads
from fakes import py2_pickle_dumps


def _sample() -> dict:
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [0, 9, 3],
        b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072),
        b"filenames": [b"a.png", b"", b"c.png"],
        b"num_vis": 3072,
        "str_key": ["x", 1.5, None, True, (1, 2)],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_pickles_round_trip(protocol: int) -> None:
    obj = _sample()
    _assert_same(obj, safe_loads(pickle.dumps(obj, protocol=protocol)))


def test_python2_style_pickle_like_the_official_files() -> None:
    # Official batches: cPickle protocol 2, str as BINSTRING (read back as bytes), numpy.core globals.
    obj = {b"labels": [1, 2], b"data": np.full((2, 3072), 7, dtype=np.uint8), b"batch_label": b"x"}
    raw = py2_pickle_dumps(obj)
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    out = safe_load(io.BytesIO(raw))
    _assert_same(obj, out)
    assert out[b"data"].flags.writeable


def test_other_dtypes_and_shapes() -> None:
    obj = {b"f": np.linspace(0, 1, 6).reshape(2, 3), b"i": np.arange(4, dtype=np.int32), b"e": np.zeros((0, 5))}
    _assert_same(obj, safe_loads(pickle.dumps(obj, protocol=2)))


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_os_system_payload_is_refused_and_never_runs(tmp_path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    raw = pickle.dumps({b"data": _Payload(os.system, f"touch {marker}")}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        safe_loads(raw)
    assert not marker.exists()


@pytest.mark.parametrize(
    "func, args",
    [
        (eval, ("1+1",)),
        (exec, ("pass",)),
        (getattr, ("text", "upper")),
        (np.load, ("x.npy",)),
        (__import__, ("os",)),
        (pickle.loads, (b"N.",)),
    ],
)
def test_other_callables_are_refused(func, args) -> None:
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        safe_loads(pickle.dumps([1, _Payload(func, *args)], protocol=2))


def test_error_names_the_forbidden_global() -> None:
    raw = b"\x80\x02cposix\nsystem\nq\x00."
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system"):
        safe_loads(raw)


def test_module_named_in_file_is_never_imported(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod_distrain_test.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = b"\x80\x02cevil_mod_distrain_test\nf\n)R."
    with pytest.raises(pickle.UnpicklingError, match="evil_mod_distrain_test.f"):
        safe_loads(raw)
    assert not marker.exists()
    assert "evil_mod_distrain_test" not in sys.modules


def test_codecs_encode_only_latin1() -> None:
    # Protocol 2 bytes are _codecs.encode(text, 'latin1'); any other codec (zlib bombs...) is refused.
    ok = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x06\x00\x00\x00latin1\x86R."
    assert safe_loads(ok) == b"hi"
    bad = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(pickle.UnpicklingError, match="zlib"):
        safe_loads(bad)


def test_bytes_of_huge_size_is_refused() -> None:
    raw = b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x7f\x85R."  # bytes(2**31 - ...) would allocate 2 GB
    with pytest.raises(pickle.UnpicklingError, match="bytes"):
        safe_loads(raw)
    assert safe_loads(b"\x80\x02c__builtin__\nbytes\n)R.") == b""


def test_persistent_ids_are_refused() -> None:
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(b"\x80\x02K\x01Q.")


@pytest.mark.parametrize("raw", [b"", b"\x80\x02}q\x00(U\x04data", b"not a pickle at all"])
def test_truncated_or_garbage_input_raises(raw: bytes) -> None:
    with pytest.raises(Exception):
        safe_loads(raw)
