"""Deployed INT8 vs FP32 and ONNX Runtime's own quantizers on MobileNetV2, ResNet-18, MiniLM.

Same options as ``quantaware bench``:

    PYTHONPATH=src python benchmarks/deploy.py --json deploy.json
    PYTHONPATH=src python benchmarks/deploy.py --quick --models resnet18
"""

from __future__ import annotations

import argparse
import logging
import sys

from quantaware.cli import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    logging.basicConfig(level=logging.WARNING)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
