"""adaptkit: fine-tune a Hugging Face model with one call.

    model = adaptkit.adapt(model, "lora")        # "bottleneck", "prefix", "linear_probe", "full", "ia3", ...
    adaptkit.summary(model); adaptkit.save(model, "out/")
    model = adaptkit.load("out/", base_model); plain = adaptkit.merge(model)
"""

from adaptkit import errors
from adaptkit.core import (Summary, adapt, add_adapter, is_quantized, load, merge, save, set_adapter, strategy_of,
                           summary)
from adaptkit.check import CheckReport, check
from adaptkit.distributed import require_processes
from adaptkit.estimate import Estimate, estimate
from adaptkit.sanity import SanityReport, sanity_check
from adaptkit.quantization import load_model
from adaptkit.strategies import REGISTRY as STRATEGIES
from adaptkit.strategies.base import Strategy
from adaptkit.strategies.full import Full
from adaptkit.strategies.linear_probe import LinearProbe
from adaptkit.strategies.lora import LoRA
from adaptkit.strategies.peft_method import PeftMethod
from adaptkit.strategies.prefix import Prefix

from adaptkit.strategies.bottleneck import Bottleneck

from adaptkit import hf as _hf

_hf.register_auto_classes()  # AutoModel*.from_pretrained on an adapter folder names adaptkit.load

__all__ = ["adapt", "summary", "save", "load", "merge", "add_adapter", "set_adapter", "strategy_of",
           "is_quantized", "load_model", "require_processes", "check", "estimate", "sanity_check", "Summary",
           "CheckReport", "Estimate", "SanityReport", "Strategy", "STRATEGIES", "LoRA", "Prefix", "Bottleneck", "LinearProbe",
           "Full", "PeftMethod", "errors"]
