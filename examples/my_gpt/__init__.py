"""An example package gradwise trains by import path: a small Hugging Face GPT-2 and a byte-level corpus.

    cd examples
    gradwise train --config my_gpt/config.yaml
    gradwise train model.factory=my_gpt.models:build data.factory=my_gpt.data:build model.args.n_layer=4

docs/your_model.md runs every gradwise command on it.
"""
