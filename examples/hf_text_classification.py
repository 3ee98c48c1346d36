"""Text classification (BERT built from a config) with transformers' `DataCollatorWithPadding`, a macro-F1
computed over the whole validation and test sets (torchmetrics), and early stopping on it.

Each line of four standard-library modules is classified by the module it comes from; the classes are
unbalanced, so macro-F1 (over the whole set: a per-batch mean of F1 is not the set's F1) says more than
accuracy. A metric object (update / compute / reset) sees every row of an evaluation set; early
stopping watches `val_f1`, higher being better because the metric says so, and the run ends with the
weights of its best evaluation.

    python examples/hf_text_classification.py [--steps 400] [--out runs/classify]
"""

import argparse

import torch
from hf_text import LabelledLines, splits
from torchmetrics.classification import MulticlassF1Score
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

from gradwise import Trainer, load_config

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--out", default=None)
args = parser.parse_args()

tok, train, val, test = splits()
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=128,
                                                 max_position_embeddings=64, num_labels=4))
cfg = load_config(None, [f"train.steps={args.steps}", "train.batch_size=32", "optim.lr=0.001",
                         "schedule.warmup_steps=20", "train.eval_every=25", "early_stopping.patience=4",
                         "early_stopping.metric=val_f1", "log.progress=plain"])
trainer = Trainer(model, LabelledLines(train, tok), val_data=LabelledLines(val, tok),
                  test_data=LabelledLines(test, tok), collate_fn=DataCollatorWithPadding(tok),
                  metrics={"f1": MulticlassF1Score(num_classes=4, average="macro")}, config=cfg, out_dir=args.out)
summary = trainer.fit(resume=True)
best = summary["early_stopping"]
print(f"test macro-F1 {summary['test_f1']:.3f}, test accuracy {summary['test_accuracy']:.3f} "
      f"(best val_f1 {best['best_value']:.3f} at step {best['best_step']})")
