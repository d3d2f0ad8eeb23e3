#!/usr/bin/env bash
# The checks that need a GPU, in one go (about 10 minutes): the paper's path on toy copies of gemma-2-9b-it and
# ArmoRM (the same toys tests/test_paper_path.py builds) on CUDA with bf16, nccl and flash-attn where installed,
# on 1 GPU and under torchrun on every GPU (offline, and online with FSDP2); where vllm is installed, the same offline
# and online runs with --sampler vllm and the loop's phases with each sampler; then the sampler benchmark (eva's
# sampler, Hugging Face generate and vLLM side by side) and the training benchmark. One table at the end.
#
#     bash scripts/gpu_check.sh                 # uses .venv/bin/python when present, else python
#     PY=python OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "error: no CUDA device visible to $PY" >&2; exit 1; }
FLASH=$($PY -c "import importlib.util as u; print('yes' if u.find_spec('flash_attn') else 'no')")
VLLM=$($PY -c "import importlib.util as u; print('yes' if u.find_spec('vllm') else 'no')")
ROWS=()

# toy models and prompts, built in code as the tests build them (nothing is downloaded)
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
import conftest
out = Path(sys.argv[1])
for name, make in (("gemma", conftest.make_toy_gemma2), ("armorm", conftest.make_toy_armorm)):
    if not (out / name / "config.json").exists():
        make(out / name)
from test_paper_path import PROMPTS
(out / "prompts.jsonl").write_text("".join(json.dumps({"prompt_id": f"uf{i}", "prompt": p}) + "\n"
                                           for i, p in enumerate(PROMPTS)))
EOF

check() {  # check NAME COMMAND...: run it, keep its log, add a row
    local name=$1; shift
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    ROWS+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | $((SECONDS - start)) s | $(tail -n 1 "$OUT/$name.log" | cut -c1-90) |")
}

TOY=(--preset paper --model "$OUT/gemma" --reward "hf:$OUT/armorm" --seed_prompts "$OUT/prompts.jsonl"
     --max_new_tokens 16 --max_prompt_tokens 64 --eval_max_new_tokens 16 --creator_max_new_tokens 32
     --max_heldout_prompts 8 --gen_batch_size 4)
rm -rf "$OUT/one_gpu" "$OUT/all_gpus" "$OUT/online"
check paper_path_1_gpu $PY train_eva.py "${TOY[@]}" --run_dir "$OUT/one_gpu"
check "paper_path_${GPUS}_gpus_fsdp2" $PY -m torch.distributed.run --standalone --nproc_per_node="$GPUS" train_eva.py \
    "${TOY[@]}" --run_dir "$OUT/all_gpus"
check "online_${GPUS}_gpus_fsdp2" $PY -m torch.distributed.run --standalone --nproc_per_node="$GPUS" train_eva.py \
    "${TOY[@]}" --online --online_steps 4 --online_prompts "$GPUS" --evolve_every 2 --save_every 2 \
    --run_dir "$OUT/online"
check paper_path_lora_qlora $PY train_eva.py "${TOY[@]}" --lora --no-fsdp --load_in_4bit --lr 5e-5 --run_dir "$OUT/qlora"
if [ "$VLLM" = yes ]; then
    rm -rf "$OUT/one_gpu_vllm" "$OUT/online_vllm"
    check paper_path_1_gpu_vllm $PY train_eva.py "${TOY[@]}" --sampler vllm --run_dir "$OUT/one_gpu_vllm"
    check "online_${GPUS}_gpus_vllm" $PY -m torch.distributed.run --standalone --nproc_per_node="$GPUS" train_eva.py \
        "${TOY[@]}" --sampler vllm --lora --no-fsdp --lr 5e-5 --online --online_steps 4 --online_prompts "$GPUS" \
        --evolve_every 2 --save_every 2 --run_dir "$OUT/online_vllm"
    # the loop's phases, seconds with each sampler (iteration 0, then 1)
    $PY - "$OUT/one_gpu/metrics.jsonl" "$OUT/one_gpu_vllm/metrics.jsonl" >"$OUT/phases.md" <<'EOF2'
import json, sys
runs = [{(r["iteration"], r["phase"]): r["seconds"] for r in map(json.loads, open(path)) if "seconds" in r}
        for path in sys.argv[1:]]
print("| iteration, phase | eva sampler (s) | vLLM (s) |\n|---|---|---|")
for key in runs[0]:
    print(f"| {key[0]}, {key[1]} | {runs[0][key]} | {runs[1].get(key, '-')} |")
EOF2
    BENCH_VLLM=--vllm
fi
check bench_generate $PY bench/bench_generate.py --device cuda --prompts 64 -n 4 --max_new_tokens 256 ${BENCH_VLLM:-}
check bench_train $PY bench/bench_train.py --device cuda

echo
echo "GPUs: $GPUS x $($PY -c "import torch; print(torch.cuda.get_device_name(0))"); torch $($PY -c "import torch; print(torch.__version__)"); flash-attn installed: $FLASH; vllm installed: $VLLM"
echo "| check | result | time | last line of its log ($OUT/<check>.log) |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
[ -f "$OUT/phases.md" ] && { echo; cat "$OUT/phases.md"; }
grep -h " / hf generate\|ours / vllm" "$OUT/bench_generate.log"
