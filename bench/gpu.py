"""The edit and generation measurements on CUDA, with a randomly initialised LLaMA-3-8B-shaped model.

    python -m bench.gpu --out $OUT/gpu.json                 # on a CUDA host, bf16
    python -m bench.gpu --shape tiny --device cpu --dtype fp32   # a quick check of the script itself

No weights can be downloaded, so the model has LLaMA-3-8B's shape (32 blocks, d 4096, D 14336,
GQA 32/8 heads, vocab 128256) with random weights, and the tokenizer is a byte-level BPE trained
here on a few sentences. Speed does not depend on what the weights say. Measured: seconds per
edit for the fast path and the reference loop; tokens/s and time to first token for transformers'
`generate` on the unmodified model and for the engine with 0 and 1,000 stored edits, memory off
and firing.
"""

from __future__ import annotations

import argparse
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench.common import median, table, write_json
from bench.generation import HEADERS as GENERATION_HEADERS, measure as measure_generation
from memoir_core import MemoirConfig, MemoirEngine
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


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|eos|>", pad_token="<|eos|>")
    return prepare_tokenizer(fast)


def build_model(shape: str, device: str, dtype: torch.dtype, eos_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(**SHAPES[shape], eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=eos_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random init directly on the device
    return prepare_model(model)


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
    timings = {}
    for name, which in (("fast", engine), ("reference", reference)):
        seconds = []
        for prompt, target in facts:
            sync()
            result = which.edit(prompt, target)
            sync()
            seconds.append(result.seconds)
        timings[name] = seconds
    difference = (engine.master_weight - reference.master_weight).abs().max().item()

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
        "generation": generation,
    }
    if args.device.startswith("cuda"):
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(table(["edit path", "median s/edit"], [["fast", summary["fast_median_s"]], ["reference", summary["reference_median_s"]],
                                                 ["speed-up", summary["speedup_median"]]]))
    print(table(GENERATION_HEADERS, rows))
    write_json(args.out, {"benchmark": "gpu", **summary})


if __name__ == "__main__":
    main()
