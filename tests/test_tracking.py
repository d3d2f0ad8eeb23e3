"""--report_to: metrics.jsonl records reach TensorBoard, wandb (offline) and trackio (local), read back with each
library's own reader; bad names and missing packages are one line; only rank 0 writes."""
import json
import struct
from pathlib import Path

import pytest

import config
import parallel
import rundir
import tracking
import train_eva
from test_online import args_for as online_args
from test_train_eva import smoke_args

# What log_a_run logs, as each tracker should hold it: {tag: [(global step, value)]}.
EXPECTED = {
    "estimate/mean_reward": [(0, 0.25)], "estimate/prompts": [(0, 8.0)],
    "step/loss": [(1, 0.75), (2, 0.5), (3, 0.25)], "step/lr": [(1, 1e-3), (2, 5e-4), (3, 1e-3)],
    "train/steps": [(2, 2.0)], "train/last_loss": [(2, 0.5)],
    "evolve/children": [(2, 4.0)], "evolve/rejected/duplicate": [(2, 1.0)],
}


def log_a_run(cfg, between=lambda: None) -> None:
    """Iteration 0 (a phase, two optimizer steps, training's summary), then the run folder closed and resumed, then
    iteration 1's first records: steps count on across the resume from the done_train marker."""
    run = rundir.open_run(cfg)
    run.mark(0, "estimate", dict(prompts=8, mean_reward=0.25, seconds=1.5))
    run.log(dict(iteration=0, step=1, loss=0.75, lr=1e-3))
    run.log(dict(iteration=0, step=2, loss=0.5, lr=5e-4))
    run.mark(0, "train", dict(pairs=4, steps=2, first_loss=0.75, last_loss=0.5))
    run.close()
    between()
    run = rundir.open_run(cfg)  # resumes: iter_0 has finished phases
    run.mark(1, "evolve", dict(children=4, rejected=dict(duplicate=1), kinds="depth", first_loss=None))
    run.log(dict(iteration=1, step=1, loss=0.25, lr=1e-3))
    run.close()


@pytest.fixture(autouse=True)
def no_kill(monkeypatch):
    monkeypatch.delenv("EVA_KILL_AT", raising=False)


def tensorboard_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_holds(got: dict, expected: dict) -> None:
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_holds_every_number_at_its_global_step(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = config.Config(run_dir=str(tmp_path / "run"), report_to="tensorboard")
    log_a_run(cfg)
    got = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert_holds(got, EXPECTED)
    assert not [t for t in got if t in ("evolve/kinds", "evolve/first_loss") or t.endswith(("/iteration", "/step"))], \
        "strings, nulls and the x-axis fields are not scalars"
    assert len(got["estimate/seconds"]) == 1 and "train/pairs" in got
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6  # the file is unchanged


def wandb_history(path: Path) -> list:
    """(step, {key: value}) of every history record in a .wandb file: LevelDB-log blocks of wandb protobufs."""
    from wandb.proto import wandb_internal_pb2
    data, pos, part, rows = path.read_bytes(), 7, b"", []  # 7: ":W&B", magic, version
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])  # after a 4-byte checksum
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append((record.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                       for i in record.history.item}))
    return rows


def test_wandb_offline_run_holds_the_numbers_and_resumes_under_one_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "w1")).items():
        monkeypatch.setenv(name, value)
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    cfg = config.Config(run_dir=str(tmp_path / "run"), report_to="wandb")
    log_a_run(cfg, between=lambda: monkeypatch.setenv("WANDB_DIR", str(tmp_path / "w2")))  # two sessions' folders
    import wandb
    wandb.teardown()  # waits for wandb's writer process to finish the files (process exit does this in a real run)
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    files = [next((tmp_path / w).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")) for w in ("w1", "w2")]
    got = {}
    for path in files:
        for step, row in wandb_history(path):
            for key, value in row.items():
                got.setdefault(key, []).append((step, value))
    assert_holds(got, EXPECTED)
    assert "evolve/kinds" not in got and "evolve/first_loss" not in got


def test_wandb_mode_follows_the_environment_then_the_api_key(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode() == "offline"  # no key anywhere
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert tracking.wandb_mode() == "online"  # what `wandb login` writes
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode() is None  # wandb reads WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert tracking.wandb_mode() == "online"


def test_trackio_local_run_holds_the_numbers_and_resumes_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage
    assert SQLiteStorage.get_project_db_path("eva").parent == tmp_path / "trackio"
    cfg = config.Config(run_dir=str(tmp_path / "run"), report_to="trackio")
    log_a_run(cfg)
    assert SQLiteStorage.get_runs("eva") == ["run"], "the resumed folder continues its run"
    logs = SQLiteStorage.get_logs("eva", "run")
    got = {}
    for row in logs:
        for key, value in row.items():
            if "/" in key:
                got.setdefault(key, []).append((row["step"], value))
    assert_holds(got, EXPECTED)
    assert SQLiteStorage.get_run_config("eva", "run")["lr"] == cfg.lr


def test_report_to_names_an_unknown_tracker_and_a_missing_package(tmp_path, monkeypatch):
    base = ["--run_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError) as err:
        config.parse_config(base + ["--report_to", "tensorboard,mlflow"])
    assert str(err.value) == ("--report_to mlflow: choose from none, tensorboard, wandb, trackio "
                              "(several: comma-separated)")
    find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        find_spec(name, *a))
    with pytest.raises(ValueError) as err:
        config.parse_config(base + ["--report_to", "tensorboard,wandb"])
    assert str(err.value) == "--report_to wandb: pip install wandb"
    assert config.parse_config(base + ["--report_to", "none"]).report_to == "none"
    assert tracking.names("tensorboard, trackio,tensorboard") == ["tensorboard", "trackio"]


def test_only_rank_0_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "is_main", lambda: False)
    run = rundir.open_run(config.Config(run_dir=str(tmp_path / "run"), report_to="tensorboard,wandb,trackio"))
    run.log(dict(iteration=0, step=1, loss=0.5))
    run.close()
    assert run.trackers == {} and not (tmp_path / "run").exists()


def test_changing_report_to_resumes_without_allow_config_change(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = config.Config(run_dir=str(tmp_path / "run"))
    run = rundir.open_run(cfg)
    run.mark(0, "estimate", dict(prompts=8))
    rundir.open_run(config.Config(run_dir=cfg.run_dir, report_to="tensorboard")).close()  # no SystemExit


def count_closes(monkeypatch) -> list:
    closed, finish = [], tracking.finish
    monkeypatch.setattr(tracking, "finish", lambda trackers: closed.append(list(trackers)) or finish(trackers))
    return closed


def test_smoke_run_sends_metrics_jsonl_to_tensorboard(tmp_path, tiny_llama_dir, monkeypatch):
    """The real loop: every optimizer step and phase summary in metrics.jsonl is in the event files."""
    pytest.importorskip("tensorboard")
    closed = count_closes(monkeypatch)
    train_eva.main(smoke_args(tmp_path, tiny_llama_dir, "--heldout_prompts", "", "--report_to", "tensorboard",
                              "--creator_max_new_tokens", "8", "--creator_candidates", "1"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    steps = [r for r in records if "phase" not in r]
    assert {r["iteration"] for r in steps} == {0, 1}, "both iterations trained"
    assert [s for s, _ in got["step/loss"]] == list(range(1, len(steps) + 1)), "one x-axis across iterations"
    assert [v for _, v in got["step/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    for phase in ("estimate", "evolve", "generate", "pairs", "train"):
        mine = [r for r in records if r.get("phase") == phase]
        numbers = [k for k, v in mine[-1].items() if isinstance(v, (int, float)) and k != "iteration"]
        assert numbers, phase
        for key in numbers:
            assert [v for _, v in got[f"{phase}/{key}"]] == pytest.approx([r[key] for r in mine], rel=1e-6), key
    train_steps = [s for s, _ in got["train/steps"]]
    assert train_steps[-1] == len(steps), "training's summary sits at the last optimizer step"
    assert closed == [["tensorboard"]], "the end of the run closes its trackers, once"


def test_online_run_sends_metrics_jsonl_to_tensorboard(tmp_path, tiny_llama_dir, monkeypatch):
    """Online eva: steps and creator rounds sit at their own step; the end of the run closes the trackers."""
    pytest.importorskip("tensorboard")
    closed = count_closes(monkeypatch)
    train_eva.main(online_args(tmp_path, tiny_llama_dir, "--run_dir", str(tmp_path / "run"), "--online_steps", "2",
                               "--evolve_every", "1", "--report_to", "tensorboard"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    steps = [r for r in records if "phase" not in r]
    rounds = [r for r in records if r.get("phase") == "evolve"]
    assert got["step/reward"] == [(r["step"], pytest.approx(r["reward"], rel=1e-6)) for r in steps] and len(steps) == 2
    assert got["step/kl"] == [(r["step"], pytest.approx(r["kl"], rel=1e-6, abs=1e-9)) for r in steps]
    assert got["evolve/children"] == [(r["step"], r["children"]) for r in rounds] and len(rounds) == 1
    assert closed == [["tensorboard"]]
