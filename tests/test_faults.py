"""Every fault train_eva.py handles, one test each: bad prompt files, too-long prompts, NaN/inf losses and gradients,
out-of-memory in sampling, scoring and evaluation, creator and judge endpoints that time out or fail, config changes
on resume, interrupted writes. The kill-and-resume test is tests/test_resume.py.

    python -m pytest tests/test_faults.py -x -q        # about a minute on 2 CPU cores
"""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from test_train_eva import TINY_PROMPTS, write_prompts

import common
import config
import endpoint
import files
import generate
import losses
import parallel
import prompts
import reward
import rundir
import train_eva


def eva_args(tmp_path: Path, model: Path, *extra: str, prompts: list[dict] = TINY_PROMPTS) -> list[str]:
    """Iteration 0 only, no held-out evaluation, plain temperature sampling: the cheapest whole run."""
    return ["--preset", "smoke", "--model", str(model), "--seed_prompts",
            write_prompts(tmp_path / "prompts.jsonl", prompts), "--heldout_prompts", "", "--run_dir",
            str(tmp_path / "run"), "--top_p", "1.0", "--eva_iterations", "0", "--lr", "1e-3", *extra]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(ROOT / "train_eva.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The process failed with a final `error: ...` line and no traceback."""
    assert out.returncode != 0, f"expected a failure:\n{out.stdout[-2000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), out.stderr[-3000:]
    return last


# ------------------------------------------------------------------------------------------------- bad input
GOOD = json.dumps(TINY_PROMPTS[0])
NO_ID = json.dumps({k: v for k, v in TINY_PROMPTS[0].items() if k != "id"})
BAD_FILES = {
    # name: (file lines, what the message must contain); line numbers count blank lines, as an editor does
    "malformed_json_after_blank": ([GOOD, "", '{"id": "x", "prompt": "hi"'], ["bad.jsonl:3", "not valid JSON"]),
    "not_an_object": ([GOOD, "[1, 2]"], ["bad.jsonl:2", "expected a JSON object"]),
    "missing_prompt": ([GOOD, json.dumps({"id": "p2", "instruction_id_list": []})], ["bad.jsonl:2", "'prompt'"]),
    "repeated_prompt_without_id": ([NO_ID, GOOD, NO_ID],  # the id of a row without one is a hash of its prompt
                                   ["bad.jsonl:3", "duplicate id", "hash of its prompt", "first at", "bad.jsonl:1"]),
    "empty_prompt": ([GOOD, json.dumps({"id": "e", "prompt": "   "})], ["bad.jsonl:2", "empty field 'prompt'"]),
    "duplicate_id": ([GOOD, GOOD], ["bad.jsonl:2", "duplicate id 't0'"]),
    "duplicate_id_by_prompt_id": ([GOOD, json.dumps({"prompt_id": "t0", "prompt": "Hi.", "instruction_id_list": []})],
                                  ["bad.jsonl:2", "duplicate id 't0'"]),
    "rules_without_instructions": ([GOOD, json.dumps({"prompt_id": "u1", "prompt": "Hi."})],
                                   ["bad.jsonl:2", "missing field 'instruction_id_list'", "--reward"]),
    "unknown_instruction_id": ([GOOD, "", json.dumps({"id": "u", "prompt": "Say hi.", "instruction_id_list":
                                                      ["made_up:rule"], "kwargs": [{}]})],
                               ["bad.jsonl:3", "unknown instruction id 'made_up:rule'"]),
    "bad_kwargs": ([json.dumps({"id": "k", "prompt": "Say hi.", "instruction_id_list": ["change_case:english_lowercase"],
                                "kwargs": [{"num_words": 3}]})], ["bad.jsonl:1", "takes no kwarg 'num_words'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_prompt_file_stops_before_any_work(tmp_path, case):
    lines, expected = BAD_FILES[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    args = ["--run_dir", str(tmp_path / "run"), "--seed_prompts", str(bad), "--heldout_prompts", ""]
    with pytest.raises(ValueError) as err:
        train_eva.main(args)
    message = str(err.value)
    assert str(bad) in message and all(e in message for e in expected), message
    assert "\n" not in message
    assert not (tmp_path / "run").exists(), "bad input must stop the run before it creates its folder"


UNREADABLE = {
    # name: (how to make bad.jsonl, what the message must contain besides the file's name)
    "not_utf8": (lambda p: p.write_bytes(GOOD.encode() + b'\n{"id": "x", "prompt": "caf\xe9"}\n'),
                 ["bad.jsonl:2", "not UTF-8"]),
    "a_directory": (lambda p: p.mkdir(), ["is a directory"]),
    "bad_json": (lambda p: p.write_text(GOOD + "\n{oops\n"), ["bad.jsonl:2", "not valid JSON"]),
    "a_list_line": (lambda p: p.write_text('"just a string"\n'), ["bad.jsonl:1", "expected a JSON object"]),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
@pytest.mark.parametrize("reward", ["rules", "judge:http://127.0.0.1:9"])
def test_unreadable_prompt_file_is_named(tmp_path, case, reward):
    make, expected = UNREADABLE[case]
    bad = tmp_path / "bad.jsonl"
    make(bad)
    with pytest.raises(ValueError) as err:
        prompts.read_prompts(str(bad), reward)
    message = str(err.value)
    assert str(bad) in message and all(e in message for e in expected) and "\n" not in message, message


def test_plain_prompts_need_no_instructions_except_for_the_rules_reward(tmp_path):
    records = [{"prompt_id": "9f2c", "prompt": "Explain tides."},  # UltraFeedback's shape
               {"key": 7, "prompt": "Write a limerick."}, {"id": "x", "prompt": "Name three rivers."}]
    path = write_prompts(tmp_path / "plain.jsonl", records)
    for reward in ("hf:some/reward-model", "judge:http://127.0.0.1:9"):
        got = prompts.read_prompts(path, reward)
        assert [r["id"] for r in got] == ["9f2c", "7", "x"] and [r["prompt"] for r in got] == [
            "Explain tides.", "Write a limerick.", "Name three rivers."]
        assert all(r["instruction_id_list"] == [] and r["kwargs"] == [] for r in got)
    with pytest.raises(ValueError, match=r"plain\.jsonl:1: missing field 'instruction_id_list'"):
        prompts.read_prompts(path, "rules")


def test_bad_heldout_file_is_named_too(tmp_path):
    seeds = write_prompts(tmp_path / "seeds.jsonl", TINY_PROMPTS)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(GOOD + "\n" + json.dumps({"id": "h", "prompt": ""}) + "\n")
    with pytest.raises(ValueError, match=r"heldout\.jsonl:2: missing or empty field 'prompt'"):
        train_eva.main(["--run_dir", str(tmp_path / "run"), "--seed_prompts", seeds, "--heldout_prompts", str(heldout)])


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + json.dumps({"id": "u", "prompt": "Hi.", "instruction_id_list": ["nope:x"]}) + "\n")
    line = one_error_line(run_cli("--run_dir", str(tmp_path / "run"), "--seed_prompts", str(bad)))
    assert "bad.jsonl:2" in line and "nope:x" in line


class StopAfterPool(Exception):
    """Raised in place of the first sampling call: the test only needs the pool the run starts from."""


def test_too_long_prompts_are_skipped_and_counted(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    # The tiny prompts take 47 chat-formatted tokens, the long one 191: --max_prompt_tokens 100 drops only it.
    long_prompt = dict(TINY_PROMPTS[0], id="long", prompt="Describe the sea. " * 40)
    records = TINY_PROMPTS[:3] + [long_prompt] + TINY_PROMPTS[3:5]

    def stop(*args, **kwargs):
        raise StopAfterPool

    monkeypatch.setattr(common, "sample_and_score", stop)
    with pytest.raises(StopAfterPool):
        train_eva.main(eva_args(tmp_path, tiny_llama_dir, "--max_prompt_tokens", "100", prompts=records))
    assert "skipped 1 prompts longer than --max_prompt_tokens 100: long" in capsys.readouterr().out
    pool = files.read_jsonl(tmp_path / "run" / "iter_0" / "pool.jsonl")
    assert [r["id"] for r in pool] == ["t0", "t1", "t2", "t3", "t4"]


def test_every_prompt_too_long_is_an_error(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="every prompt is longer than --max_prompt_tokens 20"):
        train_eva.main(eva_args(tmp_path, tiny_llama_dir, "--max_prompt_tokens", "20"))


def test_prompt_and_answer_longer_than_the_context_is_an_error(tmp_path, tiny_llama_dir):
    # The tiny Llama's context is 1024 tokens: 512 for the prompt and 600 for the answer cannot fit.
    with pytest.raises(ValueError, match=r"--max_prompt_tokens 512 \+ --max_new_tokens 600 exceed .*1024 tokens"):
        train_eva.main(eva_args(tmp_path, tiny_llama_dir, "--max_prompt_tokens", "512", "--max_new_tokens", "600"))


# ------------------------------------------------------------------------------------------------- numerical faults
def poisoned_loss(monkeypatch, poison, from_call: int) -> list:
    """losses.preference_loss with `poison(loss, chosen)` applied from the from_call-th call on (0-based)."""
    real, calls = losses.preference_loss, []

    def fake(name, chosen, rejected, *args, **kwargs):
        loss, chosen_reward, rejected_reward = real(name, chosen, rejected, *args, **kwargs)
        calls.append(len(calls))
        if len(calls) > from_call:
            loss = poison(loss, chosen)
        return loss, chosen_reward, rejected_reward

    monkeypatch.setattr(losses, "preference_loss", fake)
    return calls


# smoke: 4 pairs a step in micro batches of 2 -> 2 calls a step; --epochs 3 -> 3 steps, checkpoints after 1 and 2.
# Poisoning call 4 (0-based) makes step 3 the bad one.
POISONS = {
    "nan_loss": (lambda loss, chosen: loss * torch.nan, "the dpo loss is not finite"),
    "inf_loss": (lambda loss, chosen: loss + torch.inf, "the dpo loss is not finite"),
    # finite loss, infinite gradient: d sqrt(u)/du at u = 0
    "inf_gradient": (lambda loss, chosen: loss + (chosen.sum - chosen.sum.detach()).sqrt(),
                     "the gradient norm is not finite"),
}


@pytest.mark.parametrize("case", sorted(POISONS))
def test_nonfinite_update_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama_dir, monkeypatch, case):
    poison, expected = POISONS[case]
    poisoned_loss(monkeypatch, poison, from_call=4)
    args = eva_args(tmp_path, tiny_llama_dir, "--epochs", "3", "--save_every", "1")
    with pytest.raises(SystemExit) as err:
        train_eva.main(args)
    message = str(err.value.code)
    assert message.startswith("error: iteration 0 step 3: ") and expected in message, message
    assert "last good checkpoint" in message and "nonfinite_batch.json" in message
    iter_0 = tmp_path / "run" / "iter_0"
    bad = json.loads((iter_0 / "nonfinite_batch.json").read_text())
    assert bad["step"] == 3 and bad["iteration"] == 0 and bad["prompt_ids"], bad
    pairs = files.read_jsonl(iter_0 / "pairs.jsonl")
    assert bad["prompt_ids"] == [pairs[i]["prompt_id"] for i in bad["pair_indices"]]
    state = torch.load(iter_0 / "train_state.pt", weights_only=False)
    assert state["step"] == 2, "the checkpoint of the last good step is kept"
    assert all(torch.isfinite(w).all() for w in state["weights"].values())
    assert not (iter_0 / "done_train").exists() and not (iter_0 / "adapter").exists()
    steps = [m for m in files.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2], "the bad step is never logged as done"
    assert all(m["grad_norm"] >= 0 for m in steps), "the gradient norm (before clipping) is logged each step"

    if case == "nan_loss":  # the fault gone, the same command resumes from the kept checkpoint and finishes
        monkeypatch.undo()
        train_eva.main(args)
        assert (iter_0 / "done_train").exists()
        steps = [m for m in files.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
        assert [m["step"] for m in steps] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------- out of memory
@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    import model
    return model.load_model(str(tiny_llama_dir))


def oom(message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(message)


def test_oom_in_sampling_halves_the_batch_and_changes_nothing(tiny, monkeypatch, capsys):
    solver, tokenizer = tiny
    cfg = config.Config(n_samples=2, max_new_tokens=4, gen_batch_size=8, top_p=1.0)
    records = [dict(r) for r in TINY_PROMPTS[:5]]
    scorer = reward.load_reward("rules")
    expected = common.sample_and_score(solver, tokenizer, scorer, records, cfg, 0, "estimate")

    real, sizes = generate.sample, []

    def flaky(*args, batch_size, **kwargs):
        sizes.append(batch_size)
        if batch_size > 2:  # "fits" only from 2 prompts a batch down
            raise oom()
        return real(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(generate, "sample", flaky)
    got = common.sample_and_score(solver, tokenizer, scorer, records, cfg, 0, "estimate")
    assert sizes == [8, 4, 2]
    assert got == expected, "samples do not depend on the batch size"
    err = capsys.readouterr().err
    assert "estimate: sampling: out of memory" in err and "retrying with batch size 2" in err


def test_oom_in_the_creator_halves_its_batch_and_changes_nothing(tiny, monkeypatch, capsys):
    import creator
    solver, tokenizer = tiny
    messages = [f"Rewrite this prompt: tell me about topic {i}." for i in range(5)]
    settings = dict(seed=3, max_new_tokens=4, temperature=1.0, top_p=1.0, batch_size=8)
    expected = creator.local_completer(solver, tokenizer, **settings)(messages)
    real, sizes = generate.sample, []

    def flaky(*args, batch_size, **kwargs):
        sizes.append(batch_size)
        if batch_size > 2:
            raise oom()
        return real(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(generate, "sample", flaky)
    assert creator.local_completer(solver, tokenizer, **settings)(messages) == expected
    assert sizes == [8, 4, 2]
    assert "creator: sampling: out of memory" in capsys.readouterr().err


def test_oom_in_scoring_scores_in_smaller_calls(tiny, monkeypatch, capsys):
    solver, tokenizer = tiny
    cfg = config.Config(n_samples=2, max_new_tokens=4, gen_batch_size=8, top_p=1.0)
    records = [dict(r) for r in TINY_PROMPTS[:3]]
    rules = reward.load_reward("rules")
    expected = common.sample_and_score(solver, tokenizer, rules, records, cfg, 0, "estimate")
    calls = []

    def small_score(prompts, responses):  # a reward model that runs out of memory on more than 2 responses at once
        calls.append(len(responses))
        if len(responses) > 2:
            raise RuntimeError("CUDA error: out of memory")
        return rules.score(prompts, responses)

    got = common.sample_and_score(solver, tokenizer, SimpleNamespace(score=small_score), records, cfg, 0,
                                     "estimate")
    assert got == expected
    assert calls[:2] == [6, 3] and set(calls[2:]) <= {1, 2} and sum(calls[2:]) == 6, calls
    assert "estimate: scoring: out of memory" in capsys.readouterr().err


def test_oom_with_a_batch_of_one_stops_with_one_line():
    def always(size):
        raise oom("CUDA out of memory. Tried to allocate 80.00 GiB\nmore detail")

    with pytest.raises(SystemExit) as err:
        parallel.halve_on_oom(always, 4, "generate: sampling")
    message = str(err.value.code)
    assert message.startswith("error: generate: sampling: out of memory even with a batch of 1 (CUDA out of memory")
    assert "\n" not in message and "--max_new_tokens" in message


def test_other_errors_are_not_taken_for_oom():
    def broken(size):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        parallel.halve_on_oom(broken, 8, "sampling")


def test_oom_in_evaluation_halves_the_batch(monkeypatch):
    sizes = []

    def fake_ifeval(model, tokenizer, records, *, batch_size, **kwargs):
        sizes.append(batch_size)
        if batch_size > 1:
            raise oom()
        return dict(prompt_level=1.0, instruction_level=1.0, responses=["ok"] * len(records))

    monkeypatch.setattr(common, "evaluate_ifeval", fake_ifeval)
    result = common.evaluate(None, None, [{"id": "a"}], config.Config(gen_batch_size=4))
    assert sizes == [4, 2, 1] and result["answers"] == [{"prompt_id": "a", "answer": "ok"}]


# ------------------------------------------------------------------------------------------------- endpoints
@pytest.fixture
def server():
    """A local OpenAI-style server. state["mode"]: "fail" (HTTP 500), "slow" (answers after the client timed out),
    "ok" (a rewrite). state["posts"] lists the user message of every POST."""
    state = {"mode": "fail", "posts": [], "delay": 2.0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # /v1/models: any reply means "reachable"
            self.send_response(404)
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            state["posts"].append(body["messages"][-1]["content"])
            try:
                if state["mode"] == "slow":
                    time.sleep(state["delay"])
                if state["mode"] in ("fail", "slow"):
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                reply = json.dumps({"choices": [{"message": {"content": "Write a short poem about the sea."}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting: that is the point of "slow"

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_creator_endpoint_timeout_fails_the_phase_and_keeps_finished_work(tmp_path, tiny_llama_dir, server):
    server["mode"] = "slow"  # every call outlives --endpoint_timeout
    args = eva_args(tmp_path, tiny_llama_dir, "--eva_iterations", "1", "--creator", f"endpoint:{server['url']}#m",
                    "--endpoint_timeout", "0.5", "--endpoint_retries", "1", "--creator_candidates", "1")
    line = one_error_line(run_cli(*args))
    assert "creator endpoint" in line and server["url"] in line and "failed" in line, line
    asked = server["posts"]
    assert asked and len(asked) == 2 * len(set(asked)), "each rewrite is tried twice (--endpoint_retries 1)"
    run = tmp_path / "run"
    assert (run / "iter_0" / "done_train").exists() and (run / "iter_1" / "done_select").exists()
    assert not (run / "iter_1" / "done_evolve").exists()
    kept = {p: p.stat().st_mtime_ns for p in [run / "iter_0" / "adapter" / "adapter_model.safetensors",
                                               run / "iter_1" / "samples.jsonl", run / "iter_1" / "selected.jsonl"]}

    server["mode"] = "ok"  # the endpoint is back: the same command resumes at evolve
    train_eva.main(args)
    assert (run / "iter_1" / "done_train").exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "finished phases are not redone"
    phases = [(m["iteration"], m["phase"]) for m in files.read_jsonl(run / "metrics.jsonl") if "phase" in m]
    assert phases.count((1, "estimate")) == 1 and phases.count((1, "evolve")) == 1


def test_judge_endpoint_failure_stops_the_phase_with_the_url(tmp_path, tiny_llama_dir, server):
    server["mode"] = "fail"
    args = eva_args(tmp_path, tiny_llama_dir, "--reward", f"judge:{server['url']}?model=judge",
                    "--endpoint_retries", "1", "--endpoint_timeout", "5")
    with pytest.raises(endpoint.EndpointError, match=r"failed after 2 tries: HTTP 500") as err:
        train_eva.main(args)
    assert server["url"] in str(err.value)
    assert len(server["posts"]) == 2 * len(TINY_PROMPTS) * 2, "8 prompts x 2 samples, each tried twice"
    assert not (tmp_path / "run" / "iter_0" / "samples.jsonl").exists()
    assert not (tmp_path / "run" / "iter_0" / "done_estimate").exists()


# ------------------------------------------------------------------------------------------------- files and config
def test_interrupted_write_leaves_no_file_that_looks_finished(tmp_path, monkeypatch):
    target = tmp_path / "samples.jsonl"

    class Killed(BaseException):
        pass

    def killed(src, dst):
        raise Killed  # the process dies between writing the temporary file and the rename

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(Killed):
        files.write_jsonl(target, [{"prompt_id": "a"}])
    assert not target.exists() and (tmp_path / "samples.jsonl.tmp").exists()


def test_changed_config_lists_every_field_and_the_flag_accepts_them(tmp_path, capsys):
    cfg = config.Config(run_dir=str(tmp_path / "run"))
    rundir.open_run(cfg)
    (tmp_path / "run" / "iter_0").mkdir()
    (tmp_path / "run" / "iter_0" / "done_estimate").write_text("{}\n")  # finished work makes the config binding
    changed = config.Config(run_dir=cfg.run_dir, lr=1e-3, n_samples=6)
    with pytest.raises(SystemExit) as err:
        rundir.open_run(changed)
    message = str(err.value.code)
    assert f"lr: {cfg.lr!r} -> 0.001" in message and "n_samples: 4 -> 6" in message
    assert "--allow_config_change" in message
    rundir.open_run(config.Config(run_dir=cfg.run_dir, lr=1e-3, n_samples=6, allow_config_change=True))
    assert "accepted changes: lr, n_samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 1e-3


def test_config_can_change_before_any_work_is_done(tmp_path):
    """A run that failed before finishing anything (say, a typo caught after the folder was made) restarts freely."""
    cfg = config.Config(run_dir=str(tmp_path / "run"))
    rundir.open_run(cfg)
    rundir.open_run(config.Config(run_dir=cfg.run_dir, lr=1e-3))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 1e-3
