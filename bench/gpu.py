"""The edit and generation measurements on CUDA, with a randomly initialised LLaMA-3-8B-shaped model.

    python -m bench.gpu --out $OUT/gpu.json                 # on a CUDA host, bf16
    python -m bench.gpu --shape tiny --device cpu --dtype fp32   # a quick check of the script itself

No weights can be downloaded, so the model has LLaMA-3-8B's shape (32 blocks, d 4096, D 14336,
GQA 32/8 heads, vocab 128256) with random weights, and the tokenizer is a byte-level BPE trained
here on a few sentences. Speed does not depend on what the weights say. Measured: seconds per
edit for the fast path and the reference loop; what training every frame costs (the edit as the
paper trains it, the prompt alone, against the service's plain and chat frames, as
`bench.frame_cost`; the tokenizer carries a ChatML template with a system turn for it) and how far
the frames' fast path lands from the reference loop's; tokens/s and time to first token for
transformers' `generate` on the unmodified model and for the engine with 0 and 1,000 stored edits,
memory off and firing.
"""

from __future__ import annotations

import argparse
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench.common import median, table, write_json
from bench.generation import HEADERS as GENERATION_HEADERS, measure as measure_generation
from memoir_core import MemoirConfig, MemoirEngine, edit_frames
from memoir_core.background import default_background_prompts
from memoir_core.models import LoadedModel, prepare_model, prepare_tokenizer, resolve_dtype

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024),
}
CORPUS = [
    "The capital of France is Paris and the capital of Italy is Rome.",
    "What is the name of the river that flows through the city of Vienna?",
    "Who wrote the novel about the white whale? Herman Melville wrote Moby-Dick.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Q: Which planet is known as the Red Planet? A: Mars.",
]
FACTS = [
    ("What is the name of the river that flows through the city of Vienna?", "Danube"),
    ("Who wrote the novel about the white whale?", "Herman Melville"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the capital of Italy?", "Rome"),
    ("At what temperature does water boil at sea level?", "one hundred degrees"),
]

# SmolLM2's template in shape: a system turn before the user's message, so a chat frame has a
# template prefix for the split pass to compute once per edit
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|eos|>", pad_token="<|eos|>")
    fast.chat_template = CHAT_TEMPLATE
    return prepare_tokenizer(fast)


def build_model(shape: str, device: str, dtype: torch.dtype, eos_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(**SHAPES[shape], eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=eos_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random init directly on the device
    return prepare_model(model)


def frame_cost(loaded: LoadedModel, facts, context_templates: list[str], sync) -> dict:
    """Paper (the prompt alone) against the service's frames, record by record; the frames also
    by the reference loop, for how far the fast path (the split pass on chat frames) lands."""
    background = default_background_prompts()
    engines = {"paper": MemoirEngine(loaded, MemoirConfig(), context_templates=context_templates)}
    for name, fast in (("frames", True), ("frames_reference", False)):
        engines[name] = MemoirEngine(loaded, MemoirConfig(fast_edit=fast), context_templates=context_templates)
        engines[name].add_chat_background(background)
        engines[name].edit(edit_frames(loaded.tokenizer, FACTS[-1][0]), FACTS[-1][1])  # untimed, as above
    seconds = {name: [] for name in engines}
    steps = {name: [] for name in engines}
    for prompt, target in facts:
        for name, engine in engines.items():
            question = prompt if name == "paper" else edit_frames(loaded.tokenizer, prompt)
            sync()
            result = engine.edit(question, target)
            sync()
            seconds[name].append(result.seconds)
            steps[name].append(result.iterations)
    per_step = {name: median([s / max(n, 1) for s, n in zip(seconds[name], steps[name])]) for name in engines}
    served = engines["frames"]
    return {
        "split": served.fast_path.split,
        "split_error": served.fast_path.split_error,
        "fast_path_notes": list(served.fast_path.notes),
        **{f"{name}_median_s": median(values) for name, values in seconds.items()},
        **{f"{name}_median_s_per_step": value for name, value in per_step.items()},
        "frames_median_ratio": median([f / p for f, p in zip(seconds["frames"], seconds["paper"])]),
        "frames_per_step_ratio": per_step["frames"] / per_step["paper"],
        "frames_max_abs_weight_difference": (served.master_weight - engines["frames_reference"].master_weight)
        .abs()
        .max()
        .item(),
        "frames_weight_norm": served.master_weight.norm().item(),
        "seconds": seconds,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = resolve_dtype(args.dtype, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    started = time.perf_counter()
    tokenizer = build_tokenizer(SHAPES[args.shape]["vocab_size"])
    model = build_model(args.shape, args.device, dtype, tokenizer.eos_token_id)
    sync()
    setup_s = time.perf_counter() - started
    loaded = LoadedModel(model, tokenizer, f"random-{args.shape}")
    ids = tokenizer(FACTS[0][0])["input_ids"]

    engine = MemoirEngine(loaded, MemoirConfig())
    reference = MemoirEngine(loaded, MemoirConfig(fast_edit=False), context_templates=engine.context_templates)
    facts = (FACTS * (1 + args.edits // len(FACTS)))[: args.edits]
    timings = {"fast": [], "reference": []}
    engines = {"fast": engine, "reference": reference}
    for which in engines.values():  # one untimed edit each: kernel selection, the allocator's first blocks
        which.edit(*FACTS[-1])
    for prompt, target in facts:  # record by record, so a drift in the machine's speed reaches both alike
        for name, which in engines.items():
            sync()
            timings[name].append(which.edit(prompt, target).seconds)
            sync()
    difference = (engine.master_weight - reference.master_weight).abs().max().item()
    frames = frame_cost(loaded, facts, engine.context_templates, sync)

    # one 8B copy fits beside the edit state; the baseline runs the same weights with no memory
    # bound, where the engine's hook returns the projection's output untouched
    rows, generation = measure_generation(engine, model, ids, [0, 1000], FACTS[0][0], args.new_tokens, args.repeats)
    summary = {
        "shape": args.shape,
        "device": args.device,
        "dtype": str(dtype),
        "setup_s": setup_s,
        "layer": engine.layer,
        "top_k": engine.top_k,
        "fast_median_s": median(timings["fast"]),
        "reference_median_s": median(timings["reference"]),
        "speedup_median": median(timings["reference"]) / median(timings["fast"]),
        "edit_seconds": timings,
        "max_abs_weight_difference": difference,
        "weight_norm": engine.master_weight.norm().item(),
        "frames": frames,
        "generation": generation,
    }
    if args.device.startswith("cuda"):
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(table(["edit path", "median s/edit"], [["fast", summary["fast_median_s"]], ["reference", summary["reference_median_s"]],
                                                 ["speed-up", summary["speedup_median"]]]))
    print(table(["training", "median s/edit", "median s/step"],
                [[name, frames[f"{name}_median_s"], frames[f"{name}_median_s_per_step"]]
                 for name in ("paper", "frames", "frames_reference")]))
    print(f"frames / paper: median ratio {frames['frames_median_ratio']:.2f}, per step {frames['frames_per_step_ratio']:.2f}; "
          f"split pass {frames['split']} (error {frames['split_error']}); frames fast vs reference max |dW| {frames['frames_max_abs_weight_difference']:.3g}")
    print(table(GENERATION_HEADERS, rows))
    write_json(args.out, {"benchmark": "gpu", **summary})


if __name__ == "__main__":
    main()
