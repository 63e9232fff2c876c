"""Training metrics in TensorBoard (default) and Weights & Biases (offline here), read back from what they wrote; and
what the trainer prints."""
import glob
import json
import struct
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, debug_overrides
from tests.runs import train
from tests.test_training import _args
from tokenformer_mp.config import ConfigError, load_config, validate
from tokenformer_mp.parallel.local import run_ranks

METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "val_loss")


def wandb_records(path: str) -> list:
    """The records of an offline W&B run file (run-ID.wandb): a ':W&B' header, then LevelDB-log framed protobufs
    (32 KiB blocks; each chunk: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). wandb 0.31 ships no
    Python reader of its own (its Go core reads them)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    records, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def test_tensorboard_and_wandb_are_written_by_rank_0_and_read_back(corpus, tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    kw = {"train.grad_accum_steps": 1, "train.eval_interval": 2, "train.eval_iters": 1,
          "logging.wandb_project": "tokenformer-test", "logging.wandb_mode": "offline"}
    first = run_ranks(2, train, debug_overrides(corpus, run, **kw, **{"train.steps": 2}))[0]  # DP=2
    second = run_ranks(1, train, debug_overrides(corpus, run, **kw, **{"train.steps": 4}))[0]  # resumed, alone
    history = first + second
    assert [h["step"] for h in history] == [1, 2, 3, 4]

    # TensorBoard: one event file per start (rank 0 only), every metric at every step, the config as text
    assert len(glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for name in METRICS:
        want = [(h["step"], h[name]) for h in history if name in h]
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2, name
        assert all(abs(g - w) <= 1e-6 * abs(w) for (_, g), (_, w) in zip(got, want)), (name, got, want)  # float32
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "wandb_project: tokenformer-test" in text and "hidden_size: 128" in text

    # W&B: one offline run directory per start, both the same run (its id kept in the run directory)
    runs = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2
    run_id = (run / "wandb_run_id").read_text().strip()
    assert all(r.endswith(f"run-{run_id}.wandb") for r in runs)
    logged, config = {}, None
    for path in runs:
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                config = {c.key: json.loads(c.value_json) for c in r.run.config.update}
            elif kind == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                logged[items["_step"]] = items
    assert config["model"]["hidden_size"] == 128 and config["logging"]["wandb_mode"] == "offline"
    assert sorted(logged) == [1, 2, 3, 4]
    for h in history:
        for name in METRICS:
            if name in h:
                assert logged[h["step"]][name] == pytest.approx(h[name], rel=1e-12), (h["step"], name)


def test_logging_config_is_validated():
    cfg = load_config("configs/debug.yaml", {"logging.wandb_mode": "cloud"})
    with pytest.raises(ConfigError, match="logging.wandb_mode: 'cloud': online or offline"):
        validate(cfg, check_paths=False)
    with pytest.raises(ConfigError, match="logging.tensorbord: unknown key"):
        load_config("configs/debug.yaml", {"logging.tensorbord": False})


def test_the_console_holds_the_trainers_lines_only(sample, tmp_path):
    """The trainer's output captured (a pipe, as in a log file): its own log lines, each on a line of its own (no
    progress bar redrawn into them), and no library's INFO lines (megatron-core's dataset builder: a dozen and more)
    unless --verbose."""
    def run(run_dir, *extra):
        args = _args(debug_overrides(sample, run_dir, **{"train.steps": 4, "train.log_interval": 2}))
        res = subprocess.run([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args,
                              *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return (res.stdout + res.stderr).splitlines()

    lines = run(tmp_path / "quiet")
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split("|")[0].split()[1] for line in steps] == ["2/4", "4/4"], lines
    assert not any("train:" in line or "\r" in line for line in lines), [x for x in lines if "train:" in x]
    libraries = [line for line in lines if " INFO " in line and " INFO tokenformer_mp" not in line or "[INFO]" in line]
    assert not libraries, libraries
    assert any(" INFO tokenformer_mp" in line for line in lines)  # the project's own lines stay
    verbose = run(tmp_path / "verbose", "--verbose")
    assert sum(" INFO megatron.core.datasets" in line for line in verbose) >= 10
