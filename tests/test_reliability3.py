"""Reliability round 3 (issue 27): a paused copy into the intake folder, files that are not
what they should be (not UTF-8, a folder, binary), a buffer path that does not exist, and the
messages of a refused rollback and of a busy lock."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, export_bars, run_module
from mlproject.data import DataError, load_bars
from mlproject.intake import INGESTED, REJECTED, new_bars_since, run_intake


@pytest.fixture
def market():
    return export_bars(500, seed=5)


def nt8_lines(bars: pd.DataFrame) -> list[str]:
    return [f"{t:%Y%m%d %H%M%S};{r.open:.2f};{r.high:.2f};{r.low:.2f};{r.close:.2f};{int(r.volume)}"
            for t, r in bars.iterrows()]


def age(path, seconds: float) -> None:
    os.utime(path, (time.time() - seconds,) * 2)


def intake(tmp_path, **kw):
    return run_intake(tmp_path / "drop", tmp_path / "history" / "bars.parquet", tmp_path / "state", **kw)


# -- 2. a paused copy into the intake folder ------------------------------------------------------


def test_a_copy_paused_mid_line_waits_and_is_taken_whole_once_complete(tmp_path, market):
    drop = tmp_path / "drop"
    drop.mkdir()
    lines = nt8_lines(market)
    export = drop / "ES 03-25.Last.txt"
    text = "\n".join(lines) + "\n"
    cut = text.index("\n", len(text) * 3 // 5) + 12  # paused in the middle of a line
    export.write_text(text[:cut])
    age(export, 120)  # paused for longer than settle_seconds
    paused = intake(tmp_path, settle_seconds=30)
    assert paused.waiting == [export.name] and paused.ingested == [] and paused.rejected == []
    assert export.exists() and not (drop / REJECTED).exists() and paused.history_bars == 0

    with export.open("a") as fh:  # the copy goes on and completes
        fh.write(text[cut:])
    age(export, 60)
    done = intake(tmp_path, settle_seconds=30)
    assert [i["file"] for i in done.ingested] == [export.name] and done.history_bars == len(market) == 500
    history = pd.read_parquet(tmp_path / "history" / "bars.parquet")
    np.testing.assert_allclose(history["close"].to_numpy(), market["close"].to_numpy())


def test_a_rejected_file_that_changes_is_taken_again_on_the_next_pass(tmp_path, market):
    drop = tmp_path / "drop"
    drop.mkdir()
    lines = nt8_lines(market)
    bad = drop / "b.txt"
    bad.write_text("\n".join(lines[:200] + ["20240102 093100;1;1"] + lines[200:]) + "\n")
    age(bad, 600)
    first = intake(tmp_path)
    assert [r["file"] for r in first.rejected] == ["b.txt"] and "line 201" in first.rejected[0]["error"]
    rejected = drop / REJECTED / "b.txt"
    assert rejected.exists() and (drop / REJECTED / "b.txt.error.txt").exists()
    assert intake(tmp_path).rejected == [] and rejected.exists()  # unchanged: not retried every pass

    rejected.write_text("\n".join(lines) + "\n")  # the same name written again, valid now
    age(rejected, 600)
    again = intake(tmp_path)
    assert [i["file"] for i in again.ingested] == [f"{REJECTED}/b.txt"] and again.history_bars == 500
    assert (drop / INGESTED / "b.txt").exists() and not list((drop / REJECTED).iterdir())
    assert intake(tmp_path).ingested == []


def test_a_copy_that_goes_on_after_it_was_taken_is_taken_again(tmp_path, market):
    """A copy paused exactly at a line end is complete to the eye: taken, then the copier (whose
    open file moved with it into ingested/) writes the rest: the rest is taken too."""
    drop = tmp_path / "drop"
    drop.mkdir()
    lines = nt8_lines(market)
    export = drop / "e.txt"
    export.write_text("\n".join(lines[:300]) + "\n")
    age(export, 120)
    with export.open("a") as copier:
        assert intake(tmp_path).history_bars == 300
        copier.write("\n".join(lines[300:]) + "\n")
    age(drop / INGESTED / "e.txt", 60)
    later = intake(tmp_path)
    assert [i["file"] for i in later.ingested] == [f"{INGESTED}/e.txt"] and later.history_bars == 500
    assert later.ingested[0]["new_bars"] == 200


def test_a_rejected_file_completed_by_an_older_version_is_taken_again(tmp_path, market):
    """The incident's leftover: rejected at its half line by the old intake (no record of it),
    then completed by the copier: newer than its error note, so taken."""
    drop = tmp_path / "drop"
    (drop / REJECTED).mkdir(parents=True)
    done = drop / REJECTED / "ES.txt"
    note = drop / REJECTED / "ES.txt.error.txt"
    note.write_text("line 401: expected 6 fields\n")
    age(note, 900)
    done.write_text("\n".join(nt8_lines(market)) + "\n")
    age(done, 600)
    result = intake(tmp_path)
    assert [i["file"] for i in result.ingested] == [f"{REJECTED}/ES.txt"] and result.history_bars == 500
    assert not note.exists()


# -- 7. files that are not what they should be ----------------------------------------------------


@pytest.mark.parametrize("junk", [b"\xff\xfe{\x00}\x00", b"\x80\x81\x82", b'{"a": "\xe9t\xe9"}', b"[1, 2]"])
def test_a_state_file_that_is_not_utf8_json_says_move_it_aside(tmp_path, junk):
    from pipelines.monitor import MonitorState
    from mlproject.cycle.state import STATE_FILE, CycleState

    (tmp_path / STATE_FILE).write_bytes(junk)
    with pytest.raises(ValueError, match=rf"{STATE_FILE}: not the orchestrator's state .*move it aside"):
        CycleState(tmp_path)
    (tmp_path / "monitor.json").write_bytes(junk)
    with pytest.raises(ValueError, match=r"monitor.json: not the monitor's state .*move it aside"):
        MonitorState(tmp_path)
    (tmp_path / "intake.json").write_bytes(junk)
    (tmp_path / "drop").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=r"intake.json: not the intake's state .*move it aside"):
        run_intake(tmp_path / "drop", tmp_path / "h.parquet", tmp_path)


def test_finetune_data_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from mlproject.reasoner.data import read_jsonl

    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c\u2028d"}, ensure_ascii=False).encode()
    data.write_bytes(good + b"\n" + good.replace(b'"p"', b'"p\xe9"') + b"\n")
    with pytest.raises(ValueError, match=r"train.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(data)
    data.write_bytes(good + b"\n" + good + b"\n")  # U+2028 inside a string is not a line break
    assert read_jsonl(data)["completion"].tolist() == ["c\u2028d"] * 2


def test_an_intake_history_that_is_a_folder_or_not_parquet_names_the_setting(tmp_path, market):
    (tmp_path / "drop").mkdir()
    folder = tmp_path / "history"
    folder.mkdir()
    for call in (lambda: run_intake(tmp_path / "drop", folder, tmp_path / "state"),
                 lambda: new_bars_since(folder, None)):
        with pytest.raises(ValueError, match=rf"data.intake.history {folder}: is a folder"):
            call()
    csv = tmp_path / "bars.csv"
    csv.write_text("time,open,high,low,close,volume\n")
    with pytest.raises(ValueError, match=rf"data.intake.history {csv}: not a Parquet bar history"):
        run_intake(tmp_path / "drop", csv, tmp_path / "state")
    assert not (tmp_path / "state").exists()  # refused before anything was written


def _zip_bytes() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("bars.txt", "20240102 093100;1;1;1;1;1\n")
    return out.getvalue()


def test_a_binary_file_is_named_with_a_short_printable_excerpt(tmp_path, market):
    """Hostile input, many cases in bounded time: archives, UTF-16 exports, random bytes."""
    nt8 = "\n".join(nt8_lines(market.iloc[:20])) + "\n"
    rng = np.random.default_rng(0)
    cases = {"zip": _zip_bytes(), "gzip": gzip.compress(nt8.encode()), "utf16": nt8.encode("utf-16"),
             "utf16be": b"\xfe\xff" + nt8.encode("utf-16-be"), "xls": b"\xd0\xcf\x11\xe0" + bytes(600),
             **{f"random{k}": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes() for k in range(20)},
             **{f"nonul{k}": rng.integers(1, 256, 4000, dtype=np.uint8).tobytes() for k in range(20)},
             **{f"nul{k}": nt8.encode()[:300 * k] + b"\x00" + bytes(rng.integers(0, 256, 200, dtype=np.uint8))
                for k in range(1, 5)}}
    started = time.perf_counter()
    for name, content in cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(content)
        with pytest.raises(DataError) as caught:
            load_bars(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: "), message
        assert message.isprintable() and len(message) < 400, message
        assert "not a text (NT8 export, CSV) or Parquet bar file" in message or "not UTF-8" in message, message
    assert time.perf_counter() - started < 20
    assert "unpack it" in str(pytest.raises(DataError, load_bars, tmp_path / "gzip.txt").value)
    assert "UTF-8" in str(pytest.raises(DataError, load_bars, tmp_path / "utf16.txt").value)


def test_binary_files_in_the_intake_folder_are_rejected_not_left_waiting(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    rng = np.random.default_rng(1)
    (drop / "a.zip").write_bytes(_zip_bytes())
    (drop / "b.bin").write_bytes(rng.integers(1, 256, 3000, dtype=np.uint8).tobytes())  # no NUL, no final newline
    for path in drop.iterdir():
        age(path, 600)
    result = intake(tmp_path)
    assert result.waiting == [] and sorted(r["file"] for r in result.rejected) == ["a.zip", "b.bin"]
    assert all("or Parquet bar file" in r["error"] for r in result.rejected)


def test_ingest_of_a_binary_file_exits_2_with_one_clean_line(tmp_path):
    junk = tmp_path / "bars.txt"
    junk.write_bytes(gzip.compress(b"20240102 093100;1;1;1;1;1\n" * 50))
    out = run_module([sys.executable, "-m", "pipelines.ingest", "--source", str(junk)], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {junk}: not a text (NT8 export, CSV) or Parquet bar file: a gzip archive")
    assert last.isprintable() and "\x1f" not in out.stderr


# -- 8. the buffer command on a storage path that does not exist ----------------------------------


def test_buffer_check_on_a_missing_storage_is_an_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "no" / "buffer"
    out = run_module([sys.executable, "-m", "pipelines.buffer", "check", "--set",
                      f"continuous_learning.experience_storage={missing}"], cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    assert f"continuous_learning.experience_storage {missing}: no such folder" in out.stderr
    assert not (tmp_path / "no").exists()


# -- 10. messages: a rollback from a version that does not exist, a busy lock ---------------------


def test_rollback_from_a_version_that_does_not_exist_says_so(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    from mlproject import registry

    client = MlflowClient()
    client.create_registered_model("nt8-agent")
    for _ in range(2):
        client.create_model_version("nt8-agent", str(tmp_path))
    registry.promote("nt8-agent", "1", "first", lock_file=tmp_path / "registry.lock")
    with pytest.raises(ValueError, match=r"version 999 does not exist \(Production is version 1\); nothing rolled"):
        registry.rollback("nt8-agent", expected_current="999", lock_file=tmp_path / "registry.lock")
    with pytest.raises(ValueError, match=r"Production is version 1, not 2: someone else moved it meanwhile"):
        registry.rollback("nt8-agent", expected_current="2", lock_file=tmp_path / "registry.lock")
    assert registry.production_version("nt8-agent") == "1"


HOLD = ("import sys, time\n"
        "from mlproject.locks import file_lock\n"
        "with file_lock(sys.argv[1], 5):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


def test_a_busy_lock_names_the_holding_process_and_no_file_to_remove(tmp_path):
    from mlproject.locks import LockBusy, file_lock

    lock = tmp_path / "state" / "orchestrator.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy) as caught:
            with file_lock(lock, 0.2, "another orchestrator run"):
                pass
        message = str(caught.value)
        assert message.startswith(f"another orchestrator run is in progress: process {holder.pid} (")
        assert f"kill {holder.pid}" in message and "remove the file" not in message
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, 2, "another orchestrator run"):  # the dead holder's lock went with it
        assert lock.exists()
