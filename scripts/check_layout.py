#!/usr/bin/env python3
"""The crate's shape, checked (make test runs it first; it takes a second):

1. no import cycle among the top-level modules of src/ (a file src/X.rs or a folder src/X/);
2. imports point down: a module imports only modules of lower floors (FLOORS below), or of its
   own floor when the two do not import each other;
3. no SQL string literal longer than one line outside sql/ and src/catalog/ (SQL text lives in
   sql/, statements in the catalog module);
4. every `unsafe { ... }` block has a `SAFETY:` comment in the lines just above it (or on its
   line), and every `unsafe fn` a `# Safety` section in its documentation (or is an
   `extern "C-unwind"` callback PostgreSQL calls, documented where it is registered).

Exit status 0 when all hold; otherwise each violation is printed, with its file and line.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "src")

# Floors, lowest first. A module may import any module of a lower floor.
FLOORS = [
    {"util", "error", "gucs"},
    {"catalog", "stats"},
    {"audit"},
    {"context"},
    {"crypto", "protect", "usage"},
    {"backup", "migrations"},
    {"hooks", "invalidate"},
]
SQL_WORDS = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE|ALTER TABLE|DROP|WITH)\b")


def modules():
    mods = {}
    for name in sorted(os.listdir(SRC)):
        p = os.path.join(SRC, name)
        if name.endswith(".rs") and name != "lib.rs":
            mods.setdefault(name[:-3], []).append(p)
        elif os.path.isdir(p):
            mods.setdefault(name, []).extend(
                os.path.join(d, f) for d, _, fs in os.walk(p) for f in sorted(fs) if f.endswith(".rs"))
    return mods


def strip_tests(text):
    """Unit-test modules may reach anywhere; what they import is not the crate's shape."""
    m = re.search(r"#\[cfg\(any\(test, feature = \"pg_test\"\)\)\]|#\[cfg\(test\)\]", text)
    return text[:m.start()] if m else text


def imports(mods):
    edges = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            text = strip_tests(open(f, encoding="utf-8").read())
            targets = set(re.findall(r"crate::([A-Za-z_][A-Za-z0-9_]*)", text))
            for group in re.findall(r"use\s+crate::\{([^}]*)\}", text, re.S):
                targets |= {t.strip().split("::")[0] for t in group.split(",") if t.strip()}
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def cycles(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def floor_of(m):
    for i, f in enumerate(FLOORS):
        if m in f:
            return i
    return None


def multiline_sql(path):
    """Rust string literals that span lines and read as SQL."""
    text = strip_tests(open(path, encoding="utf-8").read())
    found = []
    for m in re.finditer(r'(?<![A-Za-z0-9_\'])(r#*)?"((?:[^"\\]|\\.)*)"', text, re.S):
        body = m.group(2)
        if "\n" in body and SQL_WORDS.search(body):
            found.append(text.count("\n", 0, m.start()) + 1)
    return found


def unsafe_without_safety(path):
    lines = strip_tests(open(path, encoding="utf-8").read()).split("\n")
    out = []
    for i, line in enumerate(lines):
        code = line.split("//")[0]
        if re.search(r"\bunsafe\s*\{", code):
            window = "\n".join(lines[max(0, i - 12):i + 1])
            if "SAFETY" not in window:
                out.append((i + 1, "unsafe block without a SAFETY comment"))
        if re.search(r"\bunsafe fn\b", code) and "extern" not in code:
            doc = []
            j = i - 1
            while j >= 0 and (lines[j].strip().startswith("///") or lines[j].strip().startswith("#[")):
                doc.append(lines[j])
                j -= 1
            if not any("# Safety" in d for d in doc):
                out.append((i + 1, "unsafe fn without a # Safety section"))
    return out


def main():
    mods = modules()
    edges = imports(mods)
    problems = []
    for comp in cycles(edges):
        problems.append(f"import cycle: {' -> '.join(comp)}")
    for m in sorted(edges):
        fm = floor_of(m)
        if fm is None:
            problems.append(f"module {m} is on no floor (add it to FLOORS in scripts/check_layout.py)")
            continue
        for t in sorted(edges[m]):
            ft = floor_of(t)
            if ft is not None and ft > fm:
                problems.append(f"upward import: {m} (floor {fm}) imports {t} (floor {ft})")
            if ft == fm and m in edges.get(t, set()):
                problems.append(f"same-floor modules import each other: {m} <-> {t}")
    for m, files in sorted(mods.items()):
        for f in files:
            rel = os.path.relpath(f, ROOT)
            if m != "catalog":
                for line in multiline_sql(f):
                    problems.append(f"{rel}:{line}: SQL literal longer than one line (put it in sql/ or src/catalog/)")
            for line, what in unsafe_without_safety(f):
                problems.append(f"{rel}:{line}: {what}")
    for f in [os.path.join(SRC, "lib.rs")]:
        for line, what in unsafe_without_safety(f):
            problems.append(f"{os.path.relpath(f, ROOT)}:{line}: {what}")
    arrows = sum(len(v) for v in edges.values())
    for p in problems:
        print(p)
    print(f"check_layout: {len(mods)} modules, {arrows} import arrows, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
