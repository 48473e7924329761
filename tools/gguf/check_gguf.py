#!/usr/bin/env python3
"""Read a GGUF file with the reference reader (PyPI `gguf`, llama.cpp's gguf-py) and print
what it finds as JSON, for tests/gguf_export.rs to compare with what handgrad wrote.

    python3 tools/gguf/check_gguf.py MODEL.gguf

Output: {"version", "alignment", "metadata": {key: {"type", "value"}}, "tensors": {name:
{"type", "dims", "offset", "sum", "sumsq", "head"}}}. A metadata type is the GGUF value type
name (UINT32, FLOAT32, STRING, ...), or ARRAY[ITEM] for an array. Tensor dims are innermost
first as GGUF stores them; offset is relative to the data section; sum, sumsq and head (the
first 8 values) are of the values dequantized by gguf-py's own Q8_0 / F16 / BF16 code.
Exit status: 0 read, 1 the file could not be read, 2 the `gguf` package (or numpy) is missing.
"""

import json
import sys

try:
    import numpy as np
    import gguf
    from gguf.quants import dequantize
except ImportError as e:
    print(f"missing Python package: {e} (pip install gguf)", file=sys.stderr)
    sys.exit(2)


def type_name(types):
    if len(types) >= 2 and types[0] == gguf.GGUFValueType.ARRAY:
        return f"ARRAY[{types[-1].name}]"
    return types[0].name


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 1
    try:
        r = gguf.GGUFReader(sys.argv[1])
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer
        print(f"gguf could not read {sys.argv[1]}: {e}", file=sys.stderr)
        return 1
    out = {"metadata": {}, "tensors": {}, "alignment": int(r.alignment)}
    for name, field in r.fields.items():
        if name == "GGUF.version":
            out["version"] = int(field.contents())
        if name.startswith("GGUF."):
            continue
        out["metadata"][name] = {"type": type_name(field.types), "value": field.contents()}
    for t in r.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
        out["tensors"][t.name] = {
            "type": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "offset": int(t.data_offset) - int(r.tensors[0].data_offset),
            "sum": float(values.sum()),
            "sumsq": float((values * values).sum()),
            "head": [float(v) for v in values[:8]],
        }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
