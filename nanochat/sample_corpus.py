"""
The offline `sample` corpus: real English prose (plus some Python source) that exists on every machine with Python.

Used by `python -m nanochat.dataset --source sample` to write pretraining shards without a network, so that the
README's main command, CI and the CPU demo train on language a tiny model visibly learns from (not random tokens).

Sources, all from the running interpreter's standard library (never site-packages, so installed packages don't
change it):
  1. pydoc topics (`pydoc_data.topics`): the language reference, one document per topic;
  2. docstrings of every stdlib module, class and function (parsed with `ast`, nothing is imported; the test
     suite is skipped), and of the pip/setuptools wheels that `ensurepip` bundles;
  3. blocks of source comments from the same files;
  4. docstrings of the `builtins` types and functions, read in a fresh `python -I -S` (never this process's
     `builtins`, which libraries patch at run time, e.g. Ray replaces `print`);
  5. plain-text files shipped with the stdlib (LICENSE.txt, idlelib's README/NEWS/...);
  6. stdlib module source files, added in module-name order until the corpus reaches TARGET_CHARS.

Determinism: files are visited in sorted dotted-module-name order (never by absolute path), documents are deduped
by exact text and finally ordered by the SHA-256 of their text, which also shuffles topics across shards. The same
Python version therefore gives byte-identical shards on any machine; `corpus_fingerprint()` says which.

    python -m nanochat.sample_corpus        # print size, document count and content hash
"""

import ast
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import zipfile

TARGET_CHARS = 6_000_000  # >= 5 MB of UTF-8 with margin; tokenizer training and the CPU demo need no more
MIN_DOC_CHARS = 40  # shorter docstrings/comments ("Return self.") carry almost no language
MIN_COMMENT_CHARS = 120
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests", "idle_test"}


def _stdlib_dir():
    return sysconfig.get_paths()["stdlib"]


def _module_files(root):
    """[(dotted module name, path)] of stdlib .py files, sorted by module name (machine-path independent)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        for f in filenames:
            if f.endswith(".py"):
                found.append((prefix + f[:-3], os.path.join(dirpath, f)))
    return sorted(found)


def _read_source(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None  # a few stdlib files are latin-1 test data; they are not prose anyway


def _python_sources(root):
    """[(name, source)]: stdlib modules (sorted by dotted name), then the .py members of the pip/setuptools wheels
    that ensurepip bundles with the stdlib (sorted by wheel and member name)."""
    out = []
    for name, path in _module_files(root):
        source = _read_source(path)
        if source is not None:
            out.append((name, source))
    bundled = os.path.join(root, "ensurepip", "_bundled")
    for wheel in sorted(os.listdir(bundled)) if os.path.isdir(bundled) else []:
        if not wheel.endswith(".whl"):
            continue
        with zipfile.ZipFile(os.path.join(bundled, wheel)) as zf:
            for member in sorted(zf.namelist()):
                if member.endswith(".py"):
                    out.append((f"{wheel}:{member}", zf.read(member).decode("utf-8", "replace")))
    return out


def _docstrings(tree):
    """Docstrings of the module and of every class/function in it, nested ones included.

    Walks statement lists only (docstrings never hide inside expressions): ~10x faster than ast.walk.
    """
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                yield doc
        for field in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(c for c in children if isinstance(c, (ast.stmt, ast.excepthandler)))


def _comment_blocks(source):
    """Runs of consecutive comment-only lines, joined into one paragraph each (a line scan: cheap, deterministic)."""
    block = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            text = stripped.lstrip("#").strip()
            if text:
                block.append(text)
            continue
        if block:
            yield " ".join(block)
        block = []
    if block:
        yield " ".join(block)


# Run in a pristine interpreter (-I: no PYTHON* env vars or user site; -S: no site/sitecustomize), so the result
# is the C docstrings of this Python version only. Reading `builtins` in the calling process is not deterministic:
# libraries patch it at run time (Ray Train/Serve and tqdm_ray replace `builtins.print` with their own documented
# functions), which changed one document and shifted the later shards when the corpus was built in such a process.
_BUILTIN_DOCS_SCRIPT = """
import builtins, inspect, json, sys
docs = []
for name in sorted(vars(builtins)):
    obj = vars(builtins)[name]
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str):
        docs.append(inspect.cleandoc(doc))
    if isinstance(obj, type):
        for attr in sorted(vars(obj)):
            sub = getattr(vars(obj)[attr], "__doc__", None)
            if isinstance(sub, str):
                docs.append(inspect.cleandoc(sub))
sys.stdout.buffer.write(json.dumps(docs).encode("utf-8"))
"""


def _builtin_docs():
    """Docstrings of the `builtins` types (and their members) and functions, read in a fresh `python -I -S`."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _BUILTIN_DOCS_SCRIPT], capture_output=True, check=True,
                         timeout=120)
    for doc in json.loads(out.stdout.decode("utf-8")):
        if len(doc) >= MIN_DOC_CHARS:
            yield doc


def _text_files(root):
    names = ["LICENSE.txt"] + [f"idlelib/{n}" for n in ("README.txt", "NEWS.txt", "NEWS2x.txt", "HISTORY.txt",
                                                        "TODO.txt", "extend.txt", "CREDITS.txt", "help.html")]
    for name in names:
        path = os.path.join(root, *name.split("/"))
        if os.path.exists(path) and name.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                # One document per blank-line-separated section of >= MIN_DOC_CHARS, like short web pages.
                section = []
                for para in f.read().split("\n\n"):
                    section.append(para.strip())
                    if sum(len(s) for s in section) >= 1000:
                        yield "\n\n".join(section)
                        section = []
                if section and sum(len(s) for s in section) >= MIN_DOC_CHARS:
                    yield "\n\n".join(section)


def _clean(text):
    # Normalise line endings and make sure the text round-trips through UTF-8 (parquet strings must be valid).
    return text.replace("\r\n", "\n").encode("utf-8", "replace").decode("utf-8").strip()


def build_documents(target_chars=TARGET_CHARS):
    """The corpus as a list of strings, deterministic for a given Python version."""
    from pydoc_data.topics import topics

    root = _stdlib_dir()
    docs, seen, total = [], set(), 0

    def add(text):
        nonlocal total
        text = _clean(text)
        if len(text) >= MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            docs.append(text)
            total += len(text)

    for key in sorted(topics):
        add(topics[key])
    library_sources = []  # stdlib modules (not the wheels), for the top-up below
    for name, source in _python_sources(root):
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        if ":" not in name:
            library_sources.append(source)
        for doc in _docstrings(tree):
            add(doc)
        for block in _comment_blocks(source):
            if len(block) >= MIN_COMMENT_CHARS:
                add(block)
    for doc in _builtin_docs():
        add(doc)
    for doc in _text_files(root):
        add(doc)
    # Top up with whole source files (code is language too, and ClimbMix contains code) until the target size.
    for source in library_sources:
        if total >= target_chars:
            break
        add(source)
    # Content-addressed order: deterministic, and mixes the sources so every shard (and the val shard) looks alike.
    docs.sort(key=lambda t: hashlib.sha256(t.encode("utf-8")).digest())
    return docs


def corpus_fingerprint(docs):
    """SHA-256 over all documents (with separators), for checking that two machines built the same corpus."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def python_tag():
    return f"python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


if __name__ == "__main__":
    documents = build_documents()
    nbytes = sum(len(d.encode("utf-8")) for d in documents)
    print(f"{len(documents)} documents, {nbytes / 1e6:.2f} MB UTF-8, {python_tag()}, "
          f"sha256 {corpus_fingerprint(documents)[:16]}")
