"""Deployment: ONNX export (the only place Q/DQ is emitted) and verification."""

from quantaware.export.onnx import ExportError, export_onnx
from quantaware.export.verify import VerifyReport, verify

__all__ = ["ExportError", "VerifyReport", "export_onnx", "verify"]
