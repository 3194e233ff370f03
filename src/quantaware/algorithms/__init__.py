"""Post-training quantization algorithms, one module each, each with ``apply(...)``.

- :mod:`~quantaware.algorithms.cle`: cross-layer equalization (Nagel et al. 2019).
- :mod:`~quantaware.algorithms.bias_correction`: empirical bias correction (Nagel et al. 2019).
- :mod:`~quantaware.algorithms.adaround`: adaptive rounding (Nagel et al. 2020).
- :mod:`~quantaware.algorithms.weight_range`: MSE-optimal weight ranges.

Typical order: ``cle.apply`` on the float model, ``prepare``, ``weight_range.apply``
(low-bit weights), ``calibrate``, ``adaround.apply``, ``bias_correction.apply``.
"""
