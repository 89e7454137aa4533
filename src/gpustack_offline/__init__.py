"""Offline (air-gapped) install bundles for GPUStack: build, check, verify."""

__version__ = "0.1.0"
