"""Dynamic (per-input) bit-widths: variants, routers, the bit selector and bit-FLOPs."""
from .bitflops import LayerCost, bit_flops, layer_costs, layer_macs
from .metrics import choice_fractions, oracle_choices, precision_recall
from .model import (
           CascadeRouter,
           DynamicQuantModel,
           Routing,
           SelectorRouter,
)
from .selector import BitSelector, stem_of
from .train import SelectorConfig, train_selector

__all__ = ["BitSelector", "CascadeRouter", "DynamicQuantModel", "LayerCost", "Routing", "SelectorConfig",
           "SelectorRouter", "bit_flops", "choice_fractions", "layer_costs", "layer_macs", "oracle_choices",
           "precision_recall", "stem_of", "train_selector"]
