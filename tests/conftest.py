"""Shared fixtures: the real default model, and tiny randomly initialised models built here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from memoir_core import EditHyperParams
from memoir_core.models import LoadedModel, default_gguf_file, dequantized_copy, load_model, prepare_model, prepare_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist each worker (and every server it starts) gets its share of the cores:
    two workers each running torch on every core would oversubscribe them and both crawl."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the servers the tests start
        torch.set_num_threads(threads)


# The longest module first: xdist hands modules out in collection order, and this one (a few
# minutes of replicas under chaos) would otherwise start last and leave the other core idle.
LONGEST_FIRST = ("tests/bench/test_chaos.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONGEST_FIRST)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2 model as a cached safetensors directory (dequantized on first use)."""
    return dequantized_copy(default_gguf_file())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return prepare_tokenizer(AutoTokenizer.from_pretrained(default_model_dir))


# Random weights give small activations, so the paper's lr 1.0 moves a tiny model's memory slowly;
# the tiny-model tests use lr 10 and otherwise the paper's hyper-parameters.
TINY_HYPER = EditHyperParams(lr=10.0)


def build_tiny(arch: str, tokenizer, dtype=torch.float32, seed: int = 0) -> LoadedModel:
    """A small random model with the default tokenizer's vocabulary; std 0.1 makes its logits peaked."""
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=128,
            n_layer=4,
            n_head=4,
            n_positions=512,
            initializer_range=0.1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    model = model.to(dtype)
    return LoadedModel(prepare_model(model), tokenizer, f"tiny-{arch}-seed{seed}")


@pytest.fixture(scope="session")
def default_loaded(default_model_dir) -> LoadedModel:
    return load_model(str(default_model_dir), device="cpu", dtype="fp32")
