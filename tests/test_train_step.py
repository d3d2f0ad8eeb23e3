"""The solver update in detail: what a pair trains on (the turn's end token) and the fp32 master weights of full
fine-tuning.

    python -m pytest tests/test_train_step.py -q
"""
import json

import pytest
import torch

import creator
import model as modeling
import train_eva


def test_a_gemma_pair_ends_with_end_of_turn_and_a_cut_response_with_nothing(toy_gemma2_dir):
    tokenizer = modeling.load_tokenizer(str(toy_gemma2_dir))
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn != tokenizer.eos_token_id, "the toy folder must tell <end_of_turn> from <eos>"
    cfg = train_eva.Config(max_new_tokens=6)
    prompts = [{"id": "p", "prompt": "Say hi."}]
    samples = [{"prompt_id": "p", "responses": ["hello there", "hi", "a b c d e f g h"],
                "rewards": [1.0, 0.5, 0.0], "finish": ["stop", "stop", "length"]}]
    pair, = creator.make_pairs(prompts, samples, source="original")
    assert (pair["chosen_finish"], pair["rejected_finish"]) == ("stop", "length")
    encoded = train_eva.encode_pair(tokenizer, pair, cfg, modeling.turn_end_id(tokenizer))
    words = tokenizer("hello there", add_special_tokens=False).input_ids
    assert encoded["chosen"] == words + [end_of_turn], "the model ended its turn: it learns to end it"
    cut = tokenizer("a b c d e f g h", add_special_tokens=False).input_ids
    assert encoded["rejected"] == cut[:6] and end_of_turn not in encoded["rejected"], "cut at the cap: no end"
    assert tokenizer.eos_token_id not in encoded["chosen"] + encoded["rejected"]

    # a response that ended itself but re-tokenises longer than --max_new_tokens is cut too; a pair written before
    # finish was recorded counts as ended
    old = dict(pair, rejected="one two three four five six seven eight")
    del old["chosen_finish"], old["rejected_finish"]
    encoded = train_eva.encode_pair(tokenizer, old, cfg, modeling.turn_end_id(tokenizer))
    assert encoded["chosen"][-1] == end_of_turn
    assert len(encoded["rejected"]) == 6 and end_of_turn not in encoded["rejected"]


def test_samples_without_finish_make_pairs_that_ended():
    samples = [{"prompt_id": "p", "responses": ["a", "b"], "rewards": [1.0, 0.0]}]
    pair, = creator.make_pairs([{"id": "p", "prompt": "x"}], samples, source="original")
    assert pair["chosen_finish"] == pair["rejected_finish"] == "stop"
