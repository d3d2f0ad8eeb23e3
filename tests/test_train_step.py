"""The solver update in detail: what a pair trains on (the turn's end token) and the fp32 master weights of full
fine-tuning.

    python -m pytest tests/test_train_step.py -q
"""
import torch

import creator
import model
import rundir
import solver
import config
import trainstate


def test_a_gemma_pair_ends_with_end_of_turn_and_a_cut_response_with_nothing(toy_gemma2_dir):
    tokenizer = model.load_tokenizer(str(toy_gemma2_dir))
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn != tokenizer.eos_token_id, "the toy folder must tell <end_of_turn> from <eos>"
    cfg = config.Config(max_new_tokens=6)
    prompts = [{"id": "p", "prompt": "Say hi."}]
    samples = [{"prompt_id": "p", "responses": ["hello there", "hi", "a b c d e f g h"],
                "rewards": [1.0, 0.5, 0.0], "finish": ["stop", "stop", "length"]}]
    pair, = creator.make_pairs(prompts, samples, source="original")
    assert (pair["chosen_finish"], pair["rejected_finish"]) == ("stop", "length")
    encoded = solver.encode_pair(tokenizer, pair, cfg, model.turn_end_id(tokenizer))
    words = tokenizer("hello there", add_special_tokens=False).input_ids
    assert encoded["chosen"] == words + [end_of_turn], "the model ended its turn: it learns to end it"
    cut = tokenizer("a b c d e f g h", add_special_tokens=False).input_ids
    assert encoded["rejected"] == cut[:6] and end_of_turn not in encoded["rejected"], "cut at the cap: no end"
    assert tokenizer.eos_token_id not in encoded["chosen"] + encoded["rejected"]

    # a response that ended itself but re-tokenises longer than --max_new_tokens is cut too; a pair written before
    # finish was recorded counts as ended
    old = dict(pair, rejected="one two three four five six seven eight")
    del old["chosen_finish"], old["rejected_finish"]
    encoded = solver.encode_pair(tokenizer, old, cfg, model.turn_end_id(tokenizer))
    assert encoded["chosen"][-1] == end_of_turn
    assert len(encoded["rejected"]) == 6 and end_of_turn not in encoded["rejected"]


def test_samples_without_finish_make_pairs_that_ended():
    samples = [{"prompt_id": "p", "responses": ["a", "b"], "rewards": [1.0, 0.0]}]
    pair, = creator.make_pairs([{"id": "p", "prompt": "x"}], samples, source="original")
    assert pair["chosen_finish"] == pair["rejected_finish"] == "stop"


def one_step(policy, masters, tokenizer, tmp_path, cfg) -> None:
    """One optimizer step of solver.train on two fixed pairs."""
    pairs = [dict(prompt_id=f"p{i}", prompt=f"Name a colour, {i}.", chosen="Blue is a colour.", rejected="No.",
                  p_chosen=0.6, p_rejected=0.4, chosen_finish="stop", rejected_finish="stop") for i in range(2)]
    run = rundir.Run(tmp_path)
    summary = solver.train(policy, masters, tokenizer, pairs, cfg, run, 0, torch.device("cpu"))
    assert summary["steps"] == 1


def test_full_fine_tuning_steps_fp32_masters_of_a_bf16_model(tmp_path, tiny_llama_dir):
    # SimPO needs no reference, so both runs compute the same gradient from the same fp32 weights
    cfg = config.Config(lora=False, loss="simpo", lr=5e-7, batch_size=2, micro_batch_size=2, epochs=1,
                           warmup_ratio=0.0, vocab_chunk=0, max_new_tokens=16)
    bf16_folder = tmp_path / "bf16_model"  # a bf16 checkpoint, as gemma-2-9b-it's is
    bf16, tokenizer = model.load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    model.save_full(bf16, tokenizer, bf16_folder)
    cfg.model = str(bf16_folder)

    # as on a GPU: the sampling model in bf16, the masters in fp32 beside it
    policy, tokenizer = model.load_model(str(bf16_folder), dtype=torch.bfloat16)
    run = rundir.Run(tmp_path / "a")
    masters = trainstate.load_masters(cfg, run, torch.device("cpu"), policy)
    assert masters is not policy and all(p.dtype == torch.float32 for p in masters.parameters())
    start = {n: p.detach().clone() for n, p in masters.named_parameters()}
    one_step(policy, masters, tokenizer, tmp_path / "a", cfg)

    # the same step from an fp32 copy of the same weights, which is its own master
    reference, _ = model.load_model(str(bf16_folder), dtype=torch.float32)
    assert trainstate.load_masters(cfg, rundir.Run(tmp_path / "b"), torch.device("cpu"), reference) is reference
    one_step(reference, reference, tokenizer, tmp_path / "b", cfg)

    name = "model.layers.0.mlp.up_proj.weight"
    delta = masters.get_parameter(name).detach() - start[name]
    want = reference.get_parameter(name).detach() - start[name]
    assert delta.abs().max() > 1e-7, "a 5e-7 step must reach the weights of record"
    torch.testing.assert_close(delta, want, rtol=1e-3, atol=1e-9)
    # the step is below bf16's resolution: added to the bf16 weights directly, it rounds away almost everywhere
    in_bf16 = start[name].bfloat16()
    assert ((in_bf16 + want.bfloat16()) == in_bf16).float().mean() > 0.9

    # save_solver writes the fp32 masters (what a resume reads back) and refreshes the bf16 sampling copy
    folder = tmp_path / "a" / "iter_0"
    trainstate.save_solver(policy, masters, tokenizer, cfg, folder, torch.device("cpu"))
    from safetensors.torch import load_file
    saved = load_file(folder / "model" / "model.safetensors")
    assert saved[name].dtype == torch.float32 and torch.equal(saved[name], masters.get_parameter(name).detach())
    assert torch.equal(policy.get_parameter(name).detach(), masters.get_parameter(name).detach().bfloat16())
