"""Runs never overwrite each other: an output is claimed when the run starts (issue 24, item 3).

``default_out`` has one-second resolution: two ``kdedge train`` started in the same second used to
pick the same ``runs/train-<time>``, and the second failed after training with ``OSError:
Directory not empty``, leaving ``OUT.partial`` behind. ``export`` and ``compress-and-export`` had
the same pattern.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import yaml

from kdedge._fs import claim_file, claim_out, claim_workdir, publish_dir
from kdedge.cli import main
from kdedge.config import ExportConfig, TrainConfig
from kdedge.data import load_dataset
from kdedge.errors import ConfigError
from tests.conftest import TinyNet, make_idx_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_idx_dir(tmp_path_factory.mktemp("tiny"), n_train=96, n_test=24)


def _train_in(cwd: str, data: str, seed: int, frozen_time: str, barrier) -> None:
    """A ``kdedge train`` without --out in ``cwd``, its clock stopped at ``frozen_time`` (run in a spawned process)."""
    os.chdir(cwd)
    time.strftime = lambda fmt, *a: frozen_time  # the same second for both processes, every time
    barrier.wait()
    sys.exit(main(["train", "--model", "mlp", "--data", data, "--epochs", "2", "--seed", str(seed), "--quiet"]))


def test_two_runs_started_in_the_same_second_both_keep_their_result(tiny_dir, tmp_path):
    ctx = multiprocessing.get_context("spawn")  # not fork: the parent's OpenMP threads would not survive it
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_train_in, args=(str(tmp_path), str(tiny_dir), s, "20261202-120000", barrier)) for s in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["train-20261202-120000", "train-20261202-120000-2"]  # nothing else: no .partial, no claim files
    seeds = {yaml.safe_load((tmp_path / "runs" / r / "config.yaml").read_text())["seed"] for r in runs}
    assert seeds == {0, 1}


def test_a_taken_out_fails_at_start_in_one_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    held = claim_out(out, "train")  # another process writing OUT (a claim of this process on a fresh descriptor is the same to flock)
    try:
        code = main(["train", "--model", "mlp", "--data", str(tiny_dir), "--epochs", "1", "--quiet", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"another kdedge process is writing {out} now" in err
        data = load_dataset(str(tiny_dir))
        from kdedge.exporters import export_model

        with pytest.raises(ConfigError, match="another kdedge process is writing"):
            export_model(TinyNet(), out, data=data, config=ExportConfig(formats=("onnx",), evaluate=False))
    finally:
        held.release()
    assert not claim_file(out).exists() and not out.exists()
    assert main(["train", "--model", "mlp", "--data", str(tiny_dir), "--epochs", "1", "--quiet", "--out", str(out)]) == 0


def test_concurrent_runs_with_one_out_leave_one_result(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "kdedge", "train", "--model", "mlp", "--data", str(tiny_dir), "--epochs", "2", "--quiet", "--out", str(out)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"another kdedge process is writing {out} now" in err or f"output directory {out} already exists" in err
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_result_whose_name_was_taken_meanwhile_is_kept_and_named(tiny_dir, tmp_path):
    from kdedge.runs import train

    data = load_dataset(str(tiny_dir))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:  # something outside kdedge creates OUT while the run trains
        train(TinyNet(), data.train, data.test, config=TrainConfig(epochs=1), out=out, progress=False,
              on_epoch=lambda row: out.mkdir())
    kept = tmp_path / f"run.finished-{os.getpid()}"
    assert str(info.value) == (f"the result is complete but could not be renamed to {out} (it appeared while this run worked); "
                               f"it is in {kept} — move it where you want it")
    assert (kept / "model.safetensors").is_file() and (kept / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", kept.name]  # no claim, no .partial, no hidden temporary


def test_publish_dir_and_claims_golden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("kdedge._fs.time.strftime", lambda fmt, *a: "20261202-120000")
    with publish_dir(tmp_path / "a") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "a" / "f").read_text() == "x"
    # A default name taken in the same second gets the next suffix; a released one is free again.
    first, second = claim_out(None, "bundle"), claim_out(None, "bundle")
    assert second.path.name == first.path.name + "-2"
    first.release()
    again = claim_out(None, "bundle")
    assert again.path == first.path
    again.release()
    second.release()
    assert not any(p.exists() for p in (claim_file(first.path), claim_file(second.path)))
    # A checkpoint left by a killed run is refused without --resume, and --resume needs one.
    (tmp_path / "t.partial").mkdir()
    (tmp_path / "t.partial" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds the checkpoint of an unfinished run; continue it with --resume"):
        claim_out(tmp_path / "t", "train")
    claim_out(tmp_path / "t", "train", resume=True).release(keep=True)
    assert (tmp_path / "t.partial" / "checkpoint.pt").is_file()
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        claim_out(tmp_path / "u", "train", resume=True)
    # A search directory is claimed in place: a second search in it is refused, resumed or not.
    work = claim_workdir(tmp_path / "s", "search", resume=False)
    with pytest.raises(ConfigError, match="another kdedge process is working in"):
        claim_workdir(tmp_path / "s", "search", resume=True)
    work.release()
    claim_workdir(tmp_path / "s", "search", resume=True).release()
    with pytest.raises(ConfigError, match="already exists; pass a new --out, or --resume"):
        claim_workdir(tmp_path / "s", "search", resume=False)


def test_an_archive_that_appears_while_the_bundle_is_built_is_left_alone(tmp_path):
    from kdedge.bundle import _write_archive

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    (tmp_path / "b.tar.gz").write_bytes(b"theirs")
    with pytest.raises(ConfigError, match=r"b\.tar\.gz appeared while the bundle was built and was left as it is; the bundle is complete in"):
        _write_archive(bundle)
    assert (tmp_path / "b.tar.gz").read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.tar.gz"]
