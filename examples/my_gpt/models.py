"""The model: GPT-2 built from a config, random weights (nothing is downloaded)."""

from transformers import GPT2Config, GPT2LMHeadModel


def build(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, context: int = 64,
          dropout: float = 0.0) -> GPT2LMHeadModel:
    """A GPT-2 language model over bytes (vocabulary 256) with `n_layer` blocks of width `n_embd` (dropout 0: one
    process and data parallel compute the same run)."""
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=256, n_positions=context,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers' causal-LM loss, named (else it warns that none was set)
    return model
