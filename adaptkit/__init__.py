"""adaptkit: fine-tune a Hugging Face model with one call.

    model = adaptkit.adapt(model, "lora")        # "bottleneck", "prefix", "linear_probe", "full", "ia3", ...
    adaptkit.summary(model); adaptkit.save(model, "out/")
    model = adaptkit.load("out/", base_model); plain = adaptkit.merge(model)

Importing adaptkit changes no other library (nothing is registered in transformers' Auto classes).
"""

from adaptkit import errors
from adaptkit.check import CheckReport, check
from adaptkit.core import (Summary, adapt, add_adapter, is_quantized, load, merge, save, set_adapter, strategy_of,
                           summary)
from adaptkit.distributed import require_processes
from adaptkit.estimate import Estimate, estimate
from adaptkit.quantization import load_model
from adaptkit.recommend import Recommendation, recommend
from adaptkit.sanity import SanityReport, sanity_check
from adaptkit.strategies import REGISTRY as STRATEGIES
from adaptkit.strategies.base import Strategy
from adaptkit.strategies.bottleneck import Bottleneck
from adaptkit.strategies.full import Full
from adaptkit.strategies.linear_probe import LinearProbe
from adaptkit.strategies.lora import LoRA
from adaptkit.strategies.peft_method import PeftMethod
from adaptkit.strategies.prefix import Prefix

__all__ = ["adapt", "summary", "save", "load", "merge", "add_adapter", "set_adapter", "strategy_of", "is_quantized",
           "load_model", "require_processes", "check", "estimate", "sanity_check", "Summary", "CheckReport", "Estimate",
           "SanityReport", "Strategy", "STRATEGIES", "LoRA", "Prefix", "Bottleneck", "LinearProbe", "Full",
           "PeftMethod", "errors", "recommend", "Recommendation"]
