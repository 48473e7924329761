#!/usr/bin/env python3
"""The shape of the code, for the redesign issues' before/after figures.

Prints, for src/ (tests modules excluded where they can be told apart):
  * the longest functions outside src/backend/ (lines from `fn` to its closing brace),
  * places where configs cross as untyped JSON (`serde_json::Value`, `from_value`, `.get("key")`
    reads of JSON objects),
  * `BackendKind::` variants named outside src/backend/ (decisions by backend kind),
  * import circles between files (strongly connected components of the `use crate::...`
    graph, file level).

Usage: python3 tools/metrics/code_shape.py [--top N]
Heuristic (brace counting on lines with strings and comments removed), meant for trends.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SRC = os.path.normpath(os.path.join(ROOT, "src"))


def strip(line):
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//")[0]


def files():
    for d, _, fs in os.walk(SRC):
        for f in sorted(fs):
            if f.endswith(".rs"):
                yield os.path.join(d, f)


def non_test_lines(path):
    """Lines of a file before its `#[cfg(test)] mod tests`."""
    out = []
    with open(path) as fh:
        lines = fh.read().split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*mod \w+", lines[i + 1]):
            # skip the module: count braces
            depth = 0
            j = i + 1
            started = False
            while j < len(lines):
                s = strip(lines[j])
                depth += s.count("{") - s.count("}")
                if "{" in s:
                    started = True
                if started and depth == 0:
                    break
                j += 1
            i = j + 1
            continue
        out.append((i + 1, lines[i]))
        i += 1
    return out


FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def functions(path):
    lines = non_test_lines(path)
    result = []
    impl = None
    for k, (no, line) in enumerate(lines):
        m_impl = re.match(r"^impl(<[^>]*>)?\s+(?:[\w:<>, ]+\s+for\s+)?([\w:]+)", line)
        if m_impl:
            impl = m_impl.group(2)
        elif re.match(r"^\S", line) and not line.startswith("}") and not line.startswith("#"):
            impl = None if not line.startswith("impl") else impl
        m = FN.match(line)
        if not m:
            continue
        depth = 0
        started = False
        for j in range(k, len(lines)):
            s = strip(lines[j][1])
            if not started and ";" in s and "{" not in s:
                break  # a declaration without a body
            depth += s.count("{") - s.count("}")
            if "{" in s:
                started = True
            if started and depth <= 0:
                name = m.group(7)
                if line.startswith(" ") and impl:
                    name = f"{impl}::{name}"
                result.append((lines[j][0] - no + 1, os.path.relpath(path, ROOT), name))
                break
    return result


def json_crossings(path):
    n = 0
    for _, line in non_test_lines(path):
        s = line.split("//")[0]
        n += len(re.findall(r"serde_json::Value|\bValue::|from_value\(|\.get\(\"[a-z_]+\"\)", s))
    return n


def backend_kind_uses(path):
    n = 0
    for _, line in non_test_lines(path):
        s = line.split("//")[0]
        n += len(re.findall(r"BackendKind::[A-Z]\w*", s))
    return n


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3]
    parts = rel.split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts


def imports(path, all_modules):
    """Files this file names through `crate::`/`super::`/`self::` paths (in `use` lines,
    brace groups expanded one level, and inline paths)."""
    mod = module_of(path)
    is_mod_file = os.path.basename(path) == "mod.rs"
    deps = set()
    text = "\n".join(strip(l) for _, l in non_test_lines(path))
    paths = []
    for m in re.finditer(r"\b(crate|super|self)((?:::\w+)*)::\{([^{}]*)\}", text):
        for item in m.group(3).split(","):
            item = item.strip().split(" as ")[0]
            if item and item != "self":
                paths.append((m.group(1), m.group(2) + "::" + item))
            elif item == "self":
                paths.append((m.group(1), m.group(2)))
    for m in re.finditer(r"\b(crate|super|self)((?:::\w+)+)", text):
        paths.append((m.group(1), m.group(2)))
    for head, tail in paths:
        rest = [p for p in tail.split("::") if p]
        if head == "crate":
            base = []
        elif head == "super":
            base = mod[:-1]
        else:
            base = mod if is_mod_file else mod[:-1]
        target = base + rest
        while target and tuple(target) not in all_modules:
            target = target[:-1]
        if target and tuple(target) != tuple(mod):
            deps.add(tuple(target))
    return deps


def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main():
    top = 12
    if "--top" in sys.argv:
        top = int(sys.argv[sys.argv.index("--top") + 1])
    paths = list(files())
    fns = []
    for p in paths:
        if "/backend/" in p:
            continue
        fns.extend(functions(p))
    fns.sort(reverse=True)
    over100 = [f for f in fns if f[0] > 100]
    over120 = [f for f in fns if f[0] > 120]
    print(f"functions outside src/backend/: {len(fns)}; over 100 lines: {len(over100)}; over 120: {len(over120)}")
    for n, p, name in fns[:top]:
        print(f"  {n:4d}  {p}  {name}")
    jc = {os.path.relpath(p, ROOT): json_crossings(p) for p in paths}
    print(f"untyped JSON (serde_json::Value, from_value, .get(\"key\")): {sum(jc.values())}")
    for p, n in sorted(jc.items(), key=lambda x: -x[1])[:8]:
        if n:
            print(f"  {n:4d}  {p}")
    bk = {os.path.relpath(p, ROOT): backend_kind_uses(p) for p in paths if "/backend/" not in p}
    print(f"BackendKind variants named outside src/backend/: {sum(bk.values())}")
    for p, n in sorted(bk.items(), key=lambda x: -x[1]):
        if n:
            print(f"  {n:4d}  {p}")
    mods = {tuple(module_of(p)) for p in paths}
    graph = {tuple(module_of(p)): imports(p, mods) for p in paths}
    circles = sccs(graph)
    print(f"import circles between files: {len(circles)}")
    for c in circles:
        print("  " + " <-> ".join("::".join(m) for m in sorted(c)))


if __name__ == "__main__":
    main()
