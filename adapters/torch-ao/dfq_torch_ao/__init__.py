"""torch.ao FX and torchao PT2E toolchains for dfq-plugins.

For users of these flows without our pipeline: a ``CalibrationSet`` (from
``dfq_plugins.synthesize``) is the calibration loop source; ``for x in cs: prepared(x)``.
"""
from .fx import FxToolchain, qconfig_mapping_for
from .pt2e import PT2EToolchain, quantizer_for

__all__ = ["FxToolchain", "PT2EToolchain", "qconfig_mapping_for", "quantizer_for"]
