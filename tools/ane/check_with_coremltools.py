#!/usr/bin/env python3
"""A second source of truth for handgrad's MIL programs: coremltools.

For every `model.mil` under the given folders (as written by `handgrad ane emit`):

1. every op name exists in coremltools' op registry for the program's opset (ios16 / ios18),
   every argument name is one of the op's inputs, every required input is given, and every
   constant argument's element type is one the op accepts;
2. the program is rebuilt with coremltools' MIL builder (`mb.program`), op by op from our text
   (coremltools has no MIL text parser, so this script reads our text itself), and the type
   and shape coremltools infers for every value must equal the type we declared;
3. every weight file is compared byte for byte with what coremltools' own blob writer
   (`_BlobStorageWriter`) writes for the same values.

Exit status 0 when everything agrees. Used by `tests/ane_coremltools.rs` (`.ci/run` installs
coremltools; plain `cargo test` skips it when the package is missing).

Usage: python3 tools/ane/check_with_coremltools.py DIR [DIR...]
"""

import os
import re
import sys
import tempfile

import numpy as np

try:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry
    from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter
except ImportError as e:  # pragma: no cover - the Rust test skips before calling us
    sys.exit(f"coremltools is not installed: {e}")

TARGETS = {"ios16": ct.target.iOS16, "ios18": ct.target.iOS18}
STMT = re.compile(r"^\s*(?P<ty>tensor<[^>]*>|\w+) (?P<name>\w+) = (?P<op>\w+)\((?P<args>.*?)\)\[(?P<attrs>.*)\];\s*$")
TENSOR_TY = re.compile(r"^tensor<(\w+), \[([^\]]*)\]>")
FUNC = re.compile(r"^\s*func main<(\w+)>\((.*)\) \{\s*$")
OUTPUTS = re.compile(r"^\s*\} -> \(([^)]*)\);\s*$")
ARG = re.compile(r"(\w+) = (\([^)]*\)|\w+)")
NP = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}


def parse_type(s):
    """(dtype, shape) of `tensor<fp16, [1, 2]>` or a scalar type name."""
    m = TENSOR_TY.match(s)
    if m:
        dims = [int(d) for d in m.group(2).split(",") if d.strip()]
        return m.group(1), tuple(dims)
    return s, ()


def split_value(v):
    """`TYPE(PAYLOAD)` -> (TYPE, PAYLOAD)."""
    depth = 0
    for i, c in enumerate(v):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0:
            return v[:i], v[i + 1 : v.rindex(")")]
    raise ValueError(f"cannot read value {v!r}")


def scalar(dtype, text):
    text = text.strip()
    if dtype == "bool":
        return text == "true"
    if dtype in ("int32", "uint64"):
        return int(text)
    if dtype in ("fp16", "fp32"):
        return float.fromhex(text) if "0x" in text else float(text)
    if dtype == "string":
        return text.strip('"')
    raise ValueError(dtype)


def parse_const(attrs, ty, folder):
    """The numpy value of a const statement."""
    val = attrs[attrs.index("val = ") + len("val = ") :]
    vty, payload = split_value(val)
    dtype, shape = parse_type(vty)
    if (dtype, shape) != parse_type(ty):
        raise ValueError(f"val type {vty} differs from the declared {ty}")
    if payload.startswith("BLOBFILE"):
        path = re.search(r'"(@model_path/[^"]+)"', payload).group(1)
        offset = int(re.search(r"\((\d+)\)\)?$", payload.strip()).group(1))
        return ("blob", path.replace("@model_path", folder), offset, dtype, shape)
    if shape == ():
        v = scalar(dtype, payload)
        return NP[dtype](v) if dtype in NP else v
    items = [x for x in payload.strip()[1:-1].split(",") if x.strip()]
    arr = np.array([scalar(dtype, x) for x in items], dtype=NP[dtype])
    return arr.reshape(shape)


def read_program(path):
    folder = os.path.dirname(path)
    text = open(path).read().splitlines()
    prog = {"stmts": [], "folder": folder}
    for line in text:
        m = FUNC.match(line)
        if m:
            prog["target"] = m.group(1)
            inputs = []
            for part in re.finditer(r"(tensor<[^>]*>) (\w+)", m.group(2)):
                inputs.append((part.group(2), parse_type(part.group(1))))
            prog["inputs"] = inputs
            continue
        m = OUTPUTS.match(line)
        if m:
            prog["outputs"] = [o.strip() for o in m.group(1).split(",")]
            continue
        m = STMT.match(line)
        if m:
            args = {}
            for am in ARG.finditer(m.group("args")):
                v = am.group(2)
                args[am.group(1)] = tuple(x.strip() for x in v[1:-1].split(",")) if v.startswith("(") else v
            prog["stmts"].append((m.group("name"), m.group("ty"), m.group("op"), args, m.group("attrs")))
    return prog


def builtin(dtype):
    return types.string_to_builtin(dtype)


def check_signatures(prog, errors, where):
    target = TARGETS[prog["target"]]
    declared = {n: parse_type(t) for n, t, *_ in prog["stmts"]}
    for name, ty, op, args, attrs in prog["stmts"]:
        if op == "const":
            continue
        versions = SSAOpRegistry.core_ops.get(op)
        cls = versions.get(target) if versions else None
        if cls is None:
            errors.append(f"{where} '{name}': op '{op}' does not exist for {prog['target']}")
            continue
        spec = cls.input_spec.input_types
        for a in args:
            if a not in spec:
                errors.append(f"{where} '{name}': {op} has no input '{a}' (inputs: {', '.join(spec)})")
        for a, s in spec.items():
            if not s.optional and a not in args:
                errors.append(f"{where} '{name}': {op} requires '{a}'")
        for a, v in args.items():
            s = spec.get(a)
            dom = getattr(s, "type_domain", None) if s is not None else None
            if isinstance(v, str) and isinstance(dom, tuple) and dom:
                dt, _ = declared.get(v, (None, None))
                if dt is not None and builtin(dt) not in dom:
                    errors.append(f"{where} '{name}': {op}.{a} is {dt}, coremltools accepts {[d.__name__ for d in dom]}")


def blob_values(path, offset, dtype):
    reader = _BlobStorageReader(path)
    if dtype == "fp16":
        return np.array(reader.read_fp16_data(offset), dtype=np.uint16).view(np.float16)
    return np.array(reader.read_float_data(offset), dtype=np.float32)


def check_blob(path, offset, dtype, shape, errors, where):
    vals = blob_values(path, offset, dtype)
    if vals.size != int(np.prod(shape)):
        errors.append(f"{where}: {path} holds {vals.size} values, {shape} needs {int(np.prod(shape))}")
        return vals
    with tempfile.TemporaryDirectory() as d:
        mine = os.path.join(d, "w.bin")
        w = _BlobStorageWriter(mine)
        off = w.write_fp16_data(vals.view(np.uint16)) if dtype == "fp16" else w.write_float_data(vals)
        del w
        if off != offset:
            errors.append(f"{where}: coremltools writes the blob at {off}, ours is at {offset}")
        if open(mine, "rb").read() != open(path, "rb").read():
            errors.append(f"{where}: {path} differs from coremltools' blob writer byte for byte")
    return vals.reshape(shape)


def rebuild(prog, errors, where):
    target = TARGETS[prog["target"]]
    (iname, (idt, ishape)), = prog["inputs"]

    @mb.program(input_specs=[mb.TensorSpec(shape=ishape, dtype=builtin(idt))], opset_version=target)
    def program(x):
        env = {iname: x}
        for name, ty, op, args, attrs in prog["stmts"]:
            dt, shape = parse_type(ty)
            if op == "const":
                val = parse_const(attrs, ty, prog["folder"])
                if isinstance(val, tuple) and val[0] == "blob":
                    _, path, offset, bdt, bshape = val
                    val = check_blob(path, offset, bdt, bshape, errors, f"{where} '{name}'")
                env[name] = mb.const(val=val, name=name)
            else:
                kwargs = {a: tuple(env[x] for x in v) if isinstance(v, tuple) else env[v] for a, v in args.items()}
                env[name] = getattr(mb, op)(**kwargs, name=name)
            got = env[name]
            if tuple(got.shape) != shape or got.dtype != builtin(dt):
                errors.append(
                    f"{where} '{name}' = {op}: declared {ty}, coremltools infers "
                    f"{types.builtin_to_string(got.dtype)} {tuple(got.shape)}"
                )
        return env[prog["outputs"][0]]

    return program


def main(dirs):
    errors, checked, ops = [], 0, 0
    for top in dirs:
        for root, _, files in sorted(os.walk(top)):
            if "model.mil" not in files:
                continue
            path = os.path.join(root, "model.mil")
            where = os.path.relpath(path, top)
            prog = read_program(path)
            if "target" not in prog or "outputs" not in prog:
                errors.append(f"{where}: cannot find the function header or its outputs")
                continue
            check_signatures(prog, errors, where)
            try:
                rebuild(prog, errors, where)
            except Exception as e:  # an op coremltools refuses (type error, bad argument)
                errors.append(f"{where}: coremltools' builder refused the program: {type(e).__name__}: {e}")
            checked += 1
            ops += len(prog["stmts"])
    for e in errors:
        print("MISMATCH", e)
    print(f"coremltools {ct.__version__}: {checked} programs, {ops} statements checked, {len(errors)} mismatches")
    return 1 if errors or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
