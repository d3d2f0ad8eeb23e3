"""The README's training commands run as written, up to the weights this machine does not have.

Each `python train_eva.py ...` / `torchrun ... train_eva.py ...` line of the README is parsed and started: flags,
presets, the config file, the reward spec, the tracker, and the prompt source (a hub dataset id is served from an
offline datasets cache built here) must all pass, and the run must stop at the model with the one line that says it
is neither a folder nor in the Hugging Face cache, before any run folder is made. Files the README names `my_*` are
the user's own: the test writes small ones.
"""
import re
import shlex

import pytest

from conftest import ROOT

import common
import config
import parallel

datasets = pytest.importorskip("datasets")  # an optional extra; make test installs it
from test_prompts import hub_cache, ultra_rows  # noqa: E402


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = re.sub(r"\\\n\s*", "", text).splitlines()  # join continued lines
    return [line.strip() for line in lines if line.startswith("    ") and "train_eva.py" in line
            and line.split()[0] in ("python", "torchrun")]


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert any("Qwen/Qwen2.5-1.5B-Instruct" in c for c in COMMANDS) and any("--preset paper" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_up_to_the_missing_weights(command, tmp_path, monkeypatch):
    words = shlex.split(command.split("#")[0] if " # " in command else command)
    argv = words[words.index("train_eva.py") + 1:]
    world = next((w.split("=")[1] for w in words if w.startswith("--nproc_per_node=")), "1")
    monkeypatch.setenv("WORLD_SIZE", world)  # the batch-size checks see torchrun's world size
    monkeypatch.chdir(ROOT)
    for i, word in enumerate(argv):  # the user's own files
        if word.startswith("my_") and word.endswith(".yaml"):
            (tmp_path / word).write_text("lr: 1.0e-5\nepochs: 1\n")
            argv[i] = str(tmp_path / word)
        elif word.startswith("my_") and word.endswith(".parquet"):
            datasets.Dataset.from_list(ultra_rows(4)).to_parquet(tmp_path / word)
            argv[i] = str(tmp_path / word)
    argv += ["--run_dir", str(tmp_path / "run")]
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                        hub_cache(tmp_path, {"train_prefs": ultra_rows(80)}, "HuggingFaceH4/ultrafeedback_binarized"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(parallel, "init", lambda: "cpu")  # no process group: nothing else of torchrun is needed
    cfg = config.parse_config(argv)
    with pytest.raises(FileNotFoundError) as err:
        common.start_run(cfg)
    assert str(err.value).startswith(f"model '{cfg.model}': neither a local folder nor in the Hugging Face cache")
    assert not (tmp_path / "run").exists()
