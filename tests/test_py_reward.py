"""Tests of the `py:<file.py>:<function>` reward: the example file scored through load_reward, every one-line error of
check_spec and of scoring, None/NaN as no rating, one import per process, and a smoke run of train_eva with it.
Run: .venv/bin/python -m pytest tests/test_py_reward.py -x -q
"""
import json
import math
import sys
from pathlib import Path

import pytest

import reward
from conftest import ROOT

EXAMPLE = f"py:{ROOT / 'examples' / 'concise_reward.py'}:concise"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_example_file_scores_through_load_reward():
    reward.check_spec(EXAMPLE)
    scorer = reward.load_reward(EXAMPLE)
    long = " ".join(["word"] * 100) + "."
    rewards = scorer.score([{"id": "a", "prompt": "Why?"}, "Plain text prompts work too.", {"prompt": "x"}, "y"],
                           ["Because it is.", "Because it is", long, "   "])
    assert rewards == [1.5, 1.0, pytest.approx(1.0), 0.0]  # 100 words: halfway to 0, plus the period
    assert reward.score_sharded(scorer, ["p"], ["Short."]) == [1.5]  # without torchrun: a plain call


def test_function_gets_prompt_texts_and_may_leave_items_unrated(tmp_path):
    path = write(tmp_path, "echo.py", "def rate(prompts, responses):\n"
                                      "    return [None if r == 'skip' else float('nan') if r == 'nan' else len(p)\n"
                                      "            for p, r in zip(prompts, responses)]\n")
    scorer = reward.load_reward(f"py:{path}:rate")
    rewards = scorer.score([{"id": "1", "prompt": "abc", "instruction_id_list": []}, "hello", "z"],
                           ["fine", "skip", "nan"])
    assert rewards[0] == 3.0 and math.isnan(rewards[1]) and math.isnan(rewards[2])


def test_spec_errors_are_one_line_before_anything_runs(tmp_path):
    write(tmp_path, "broken.py", "import os\ndef rate(:\n")
    write(tmp_path, "raises.py", "import no_such_module_for_eva\n")
    write(tmp_path, "value.py", "rate = 0.5\n")
    cases = [
        (f"py:{tmp_path / 'broken.py'}", "expected py:<file.py>:<function>"),
        (f"py:{tmp_path / 'broken.py'}:", "expected py:<file.py>:<function>"),
        (f"py:{tmp_path / 'missing.py'}:rate", "missing.py: no such file"),
        (f"py:{tmp_path / 'broken.py'}:rate", "importing .*broken.py failed: SyntaxError: invalid syntax"),
        (f"py:{tmp_path / 'raises.py'}:rate",
         "importing .*raises.py failed: ModuleNotFoundError: No module named 'no_such_module_for_eva'"),
        (f"py:{tmp_path / 'value.py'}:score", "value.py defines no 'score'"),
        (f"py:{tmp_path / 'value.py'}:rate", "'rate' in .*value.py is a float, not a function"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            reward.check_spec(spec)
        assert str(err.value).startswith(f"--reward: {spec}") and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="takes no options"):
        reward.load_reward(EXAMPLE, timeout=3)


@pytest.mark.parametrize("body,message", [
    ("return [1.0]", r"py:.*bad.py:rate returned 1 rewards for 2 responses"),
    ("return 1.0", r"py:.*bad.py:rate returned a float, not a list of floats"),
    ("return ['high', 'low']", r"py:.*bad.py:rate returned 'high' for item 0: a reward must be a finite number"),
    ("return [0.0, float('inf')]", r"returned inf for item 1: a reward must be a finite number"),
    ("return [0.0, [1.0]]", r"returned \[1.0\] for item 1"),
])
def test_bad_return_values_are_one_line_naming_the_function(tmp_path, body, message):
    path = write(tmp_path, "bad.py", f"def rate(prompts, responses):\n    {body}\n")
    scorer = reward.load_reward(f"py:{path}:rate")
    with pytest.raises(ValueError, match=message) as err:
        scorer.score(["p", "q"], ["a", "b"])
    assert "\n" not in str(err.value)


def test_file_is_imported_once_per_process_under_a_name_of_its_own(tmp_path):
    # Named reward.py on purpose: eva's own reward module must stay the one that `import reward` gives.
    path = write(tmp_path, "reward.py", "from pathlib import Path\n"
                                        "with open(Path(__file__).with_suffix('.log'), 'a') as log:\n"
                                        "    log.write('imported\\n')\n"
                                        "def rate(prompts, responses):\n"
                                        "    return [1.0] * len(responses)\n")
    spec = f"py:{path}:rate"
    reward.check_spec(spec)
    scorer = reward.load_reward(spec)
    assert scorer.score(["p"], ["r"]) == [1.0]
    assert path.with_suffix(".log").read_text() == "imported\n"
    assert sys.modules["reward"] is reward


def test_train_eva_smoke_run_with_a_py_reward(tmp_path, tiny_llama_dir):
    import train_eva
    # Plain prompts, no instruction_id_list: a py: reward, like hf: and judge:, needs none.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say something about topic {i}."}) + "\n"
                               for i in range(4)))
    train_eva.main(["--preset", "smoke", "--model", str(tiny_llama_dir), "--seed_prompts", str(prompts),
                    "--heldout_prompts", "", "--eva_iterations", "0", "--run_dir", str(tmp_path / "run"),
                    "--reward", EXAMPLE])
    samples = [json.loads(line) for line in (tmp_path / "run" / "iter_0" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        assert s["rewards"] == reward.load_reward(EXAMPLE).score(["p"] * len(s["responses"]), s["responses"])


def test_the_example_in_docs_runs(tmp_path):
    text = (ROOT / "docs" / "rewards.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    path = write(tmp_path, "my_reward.py", code)
    scorer = reward.load_reward(f"py:{path}:overlap")
    rewards = scorer.score(["Describe the ocean tides.", "Hi"], ["Tides move the ocean.", "Hello"])
    assert rewards[0] == pytest.approx(2 / 3) and math.isnan(rewards[1])  # ocean, tides of describe/ocean/tides
