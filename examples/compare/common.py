"""What the three versions share: the data (byte windows of the stdlib sources) and the model (GPT-2 from a config)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_causal_lm import ByteWindows, corpus  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402


def data_and_model():
    data = corpus()
    cut = int(0.9 * len(data))
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    return ByteWindows(data[:cut], 64), ByteWindows(data[cut:], 64), model
