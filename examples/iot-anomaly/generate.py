"""Write a synthetic fleet's sensor logs for the iot-anomaly project: one CSV per device.

    python examples/iot-anomaly/generate.py --devices 8 --out examples/iot-anomaly/data --seed 0
    python examples/iot-anomaly/generate.py --ids SN-001,SN-002 --out /tmp/logs

The generator itself is :mod:`iot_anomaly.data` (so the demo can import it as
``iot_anomaly.data:generate``); this script runs it from anywhere and re-exports
:func:`generate` for code that loads this file directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from iot_anomaly.data import device_ids, generate, main  # noqa: E402

__all__ = ["device_ids", "generate", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
