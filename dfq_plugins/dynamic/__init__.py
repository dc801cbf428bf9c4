"""Dynamic (per-input) bit-widths: variants, routers, the bit selector and bit-FLOPs."""
from .bitflops import LayerCost, bit_flops, layer_costs, layer_macs
from .metrics import choice_fractions, oracle_choices, precision_recall
from .model import (
           CascadeRouter,
           DynamicQuantModel,
           EscalationRouter,
           entry_for,
           escalation_costs,
           Routing,
           SelectorRouter,
)
from .selector import BitSelector, OutputSelector, stem_of
from .train import SelectorConfig, train_selector

__all__ = ["BitSelector", "CascadeRouter", "DynamicQuantModel", "EscalationRouter", "LayerCost", "OutputSelector",
           "Routing", "SelectorConfig", "SelectorRouter", "bit_flops", "choice_fractions", "entry_for", "escalation_costs",
           "layer_costs", "layer_macs", "oracle_choices", "precision_recall", "stem_of", "train_selector"]
