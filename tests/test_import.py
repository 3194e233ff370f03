"""``import quantaware`` stays light: heavy optional dependencies load lazily."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnxruntime", "onnx", "onnxscript", "matplotlib", "transformers", "openvino", "cv2")

# One subprocess (importing torch takes seconds): what is loaded after the import,
# then after touching the lazy export API (which must load onnx: the probe works).
_PROBE = f"""
import json, sys
heavy = {HEAVY!r}
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
import quantaware
from quantaware import presets, prepare, calibrate, quantize, QuantConfig, LayerOverride
after_import = loaded()
quantaware.export_onnx
print(json.dumps([after_import, loaded()]))
"""


def test_import_does_not_load_heavy_modules():
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                            check=True, timeout=300)
    after_import, after_export_api = json.loads(result.stdout.strip().splitlines()[-1])
    assert after_import == []
    assert "onnx" in after_export_api
