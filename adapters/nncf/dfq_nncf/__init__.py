"""NNCF toolchain for dfq-plugins, and a one-line data-free switch for existing NNCF scripts.

    # before: nncf.quantize(model, nncf.Dataset(loader, transform), subset_size=300)
    # after:  dfq_nncf.quantize(model, source="zeroq", input_spec=spec, subset_size=300)
"""
from .dropin import calibration_dataset, quantize
from .openvino import calibration_dataset_openvino, quantize_openvino
from .toolchain import NNCFToolchain, advanced_parameters_for

__all__ = ["NNCFToolchain", "advanced_parameters_for", "calibration_dataset", "calibration_dataset_openvino",
           "quantize", "quantize_openvino"]
