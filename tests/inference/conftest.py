"""Fixtures for the inference tests: one tiny NorMistral-shaped checkpoint with a tokenizer, made once.

The tokenizer is a byte-level BPE trained here with `tokenizers` on a few sentences (nothing can be
downloaded) and saved next to the weights, so `AutoTokenizer.from_pretrained(model_dir)` loads it as it
loads NorMistral's. The model's vocabulary is the tokenizer's size, so every generated id decodes.
The context (max_position_embeddings) is 512, so "longer than the context" is cheap to build.
"""

import contextlib

import jax
import numpy as np
import pytest

from jaxmodel import MistralConfig, from_pretrained
from jaxmodel.parity import make_hf_checkpoint

CORPUS = [
    "Engelsk: I like cheese.\nBokmål: Jeg liker ost.\n",
    "Engelsk: The weather is nice today.\nBokmål: Været er fint i dag.\n",
    "Engelsk: Where is the train station?\nBokmål: Hvor er togstasjonen?\n",
    "Hei på deg, hvordan går det? Bare bra, takk.\n",
    "Nordavind og sol kranglet om hvem av dem som var sterkest.\n",
]


def train_tiny_tokenizer(path: str, vocab_size: int = 400):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A float32 tiny checkpoint (2 layers, 8/2 heads, head_dim 32) with its tokenizer."""
    path = str(tmp_path_factory.mktemp("inference") / "tiny")
    tok = train_tiny_tokenizer(path)
    config = MistralConfig.tiny(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=3,
                                bos_token_id=1, eos_token_id=2)
    make_hf_checkpoint(path, config, seed=3)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return from_pretrained(tiny_dir, progress=False)


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    import torch
    import transformers

    model = transformers.MistralForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # stop only where a test says so
    return model


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=n) for n in lengths]


def left_pad(prompts, pad: int = 0):
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad, np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, length - len(p):] = p
        mask[b, length - len(p):] = 1
    return ids, mask


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block (the list grows as they happen)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
