"""The exported pair (model.safetensors + model.json): crash-safe, verified, every field checked."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_distrain, smoke_args, subprocess_env
from distrain import fsio
from distrain.errors import UserError
from distrain.export import (MODEL_FILE, MODEL_JSON, clean_export_temporaries, export_model,
                             load_model)

# Run in a child that is SIGKILLed while it stands still at the chosen point of a real export:
# "between" after model.safetensors is committed, "during" inside its write (before the rename).
_EXPORTER = r"""
import json, os, sys, time
from pathlib import Path
from safetensors.torch import load_file
from distrain import export

run, flag, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
info = json.loads((run / "model.json").read_text())
sd = {k: v + 1 for k, v in load_file(str(run / "model.safetensors")).items()}  # other weights

def stand_still():
    flag.write_text("ready")
    time.sleep(600)

if where == "between":
    real = export.atomic_write_bytes
    def write(path, data):
        real(path, data)
        if Path(path).name == "model.safetensors":
            stand_still()
    export.atomic_write_bytes = write
else:
    os.fsync = lambda fd: stand_still()
export.export_model(run, sd, info)
"""


def _kill_export(run: Path, where: str, tmp_path: Path) -> None:
    flag = tmp_path / f"{where}.flag"
    child = subprocess.Popen([sys.executable, "-c", _EXPORTER, str(run), str(flag), where],
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not flag.exists():
            assert child.poll() is None, child.communicate()[1].decode()[-3000:]
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pair") / "run"
    run_distrain(["train", *smoke_args(out)], check=True)
    return out


@pytest.fixture
def image(tmp_path) -> Path:
    Image.new("RGB", (40, 30), (120, 30, 200)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


def _predict(checkpoint: Path, image: Path) -> subprocess.CompletedProcess:
    return run_distrain(["predict", "--checkpoint", str(checkpoint), "--json", "--topk", "3",
                         str(image)])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("first_export", [True, False])
def test_kill_between_the_two_files_falls_back_to_the_checkpoint(trained, tmp_path, image,
                                                                 first_export: bool) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert (run / MODEL_FILE).stat().st_mode & 0o777 == fsio.file_mode()  # the umask's, not 0600
    assert (run / MODEL_JSON).stat().st_mode & 0o777 == fsio.file_mode()
    old_json = (run / MODEL_JSON).read_bytes()
    _kill_export(run, "between", tmp_path)
    if first_export:  # a kill during the run's first export: no model.json at all
        (run / MODEL_JSON).unlink()
    else:
        assert (run / MODEL_JSON).read_bytes() == old_json  # the old description, new weights
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    got, want = _predict(run, image), _predict(latest, image)
    assert got.returncode == 0 and want.returncode == 0, got.stderr
    assert "warning: " in got.stderr and str(latest) in got.stderr
    assert ("missing" if first_export else "interrupted export") in got.stderr
    assert json.loads(got.stdout) == json.loads(want.stdout)
    if first_export:  # eval goes through the same loader
        ev = run_distrain(["eval", "--checkpoint", str(run / MODEL_FILE), "--json"])
        assert ev.returncode == 0 and json.loads(ev.stdout)["checkpoint"] == str(latest), ev.stderr
    shutil.rmtree(run / "checkpoints")  # nothing to fall back to: exit 2, one line naming the file
    bad = _predict(run, image)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert str(run / (MODEL_JSON if first_export else MODEL_FILE)) in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_inside_a_write_leaves_the_old_pair_and_a_temporary_that_is_cleaned(trained, tmp_path,
                                                                               image) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _kill_export(run, "during", tmp_path)
    stale = [p for p in run.iterdir() if p.name.startswith(fsio.TEMP_PREFIX)]
    assert len(stale) == 1 and stale[0].name.startswith(f"{fsio.TEMP_PREFIX}{MODEL_FILE}.")
    (run / f".{MODEL_FILE}.abc123.tmp").write_bytes(b"left by an older version")
    (run / ".tmp-config.yaml.x.tmp").write_bytes(b"not the export's")
    removed = clean_export_temporaries(run)
    assert sorted(p.name for p in removed) == sorted([stale[0].name, f".{MODEL_FILE}.abc123.tmp"])
    assert (run / ".tmp-config.yaml.x.tmp").exists()
    assert all((run / name).read_bytes() == data for name, data in before.items())
    got = _predict(run, image)
    assert got.returncode == 0 and "warning" not in got.stderr, got.stderr


@pytest.mark.slow
def test_a_checkpoints_own_weights_file_loads_without_a_warning(trained, capfd) -> None:
    latest = trained / "checkpoints" / (trained / "checkpoints" / "latest").read_text().strip()
    loaded = load_model(str(latest / MODEL_FILE))
    assert loaded.source == latest and "warning" not in capfd.readouterr().err


# -- what model.json says is checked -------------------------------------------------------------

@pytest.fixture
def export_dir(tmp_path) -> Path:
    from distrain.config import Config
    from distrain.export import model_info
    from distrain.models import build_model

    cfg = Config()
    cfg.data.name = "synthetic"
    torch.manual_seed(0)
    d = tmp_path / "export"
    d.mkdir()
    export_model(d, build_model("cifar10_quick", 10).state_dict(),
                 model_info(cfg, [f"c{i}" for i in range(10)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    return d


_BAD_FIELDS = {
    "format": "distrain-model/99", "architecture": 7, "num_classes": -3, "classes": "abc",
    "input_size": [3, 0, 0], "resize": 10**9, "mean": "0.5", "std": [0.25, 0.0, 0.25],
}


@pytest.mark.parametrize("key", [*_BAD_FIELDS, "num_classes_huge", "std_nan", "missing"])
def test_each_bad_field_is_a_user_error_naming_file_and_field(export_dir, key: str) -> None:
    info = json.loads((export_dir / MODEL_JSON).read_text())
    field = key.split("_huge")[0].split("_nan")[0]
    if key == "num_classes_huge":
        info["num_classes"] = 10**12
    elif key == "std_nan":
        info["std"] = [0.25, float("nan"), 0.25]
    elif key == "missing":
        field = "input_size"
        del info["input_size"]
    else:
        info[key] = _BAD_FIELDS[key]
    (export_dir / MODEL_JSON).write_text(json.dumps(info))
    with pytest.raises(UserError) as e:
        load_model(str(export_dir))
    assert str(export_dir / MODEL_JSON) in str(e.value) and f"'{field}'" in str(e.value)


def test_non_finite_weights_are_refused(export_dir, image, capsys) -> None:
    from safetensors.torch import load_file

    from distrain import cli

    info = json.loads((export_dir / MODEL_JSON).read_text())
    sd = load_file(str(export_dir / MODEL_FILE))
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name][0] = float("nan")
    export_model(export_dir, sd, info)  # a consistent pair, holding NaN
    rc = cli.main(["predict", "--checkpoint", str(export_dir), "--json", str(image)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "non-finite weights" in err
    assert str(export_dir / MODEL_FILE) in err


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_outputs_that_overflow_are_refused_not_printed_as_nan(export_dir, image, capsys) -> None:
    from safetensors.torch import load_file

    from distrain import cli

    info = json.loads((export_dir / MODEL_JSON).read_text())
    sd = {k: v * 1e30 if v.is_floating_point() else v
          for k, v in load_file(str(export_dir / MODEL_FILE)).items()}
    export_model(export_dir, sd, info)  # finite weights whose products overflow float32
    rc = cli.main(["predict", "--checkpoint", str(export_dir), "--json", str(image)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "non-finite outputs" in err and str(image) in err
    ev = run_distrain(["eval", "--checkpoint", str(export_dir), "--json", "data.name=synthetic",
                       "data.max_test_samples=64"])
    assert ev.returncode == 2 and ev.stdout == "" and "non-finite outputs" in ev.stderr, ev.stderr
