"""Quantizer parts the toolchain adapters share: range searches, learnable ranges, protocol surgery."""
