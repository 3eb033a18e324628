"""
The pretraining dataset: parquet shards of raw text, and the tool that fetches them.

Layout (same as upstream nanochat): `$NANOCHAT_BASE_DIR/base_data_climbmix/shard_XXXXX.parquet`, one string column
`text`, row groups of 1024 documents. Sorted by name, the LAST shard is the validation split, all others are train.

    python -m nanochat.dataset -n 8                       # ClimbMix from HuggingFace: shards 0..7 + val shard 6542
    python -m nanochat.dataset -n 8 -w 8 --source https://mirror.example.com/climbmix   # any HTTP mirror, same names
    python -m nanochat.dataset -n 8 --source s3://bucket/climbmix     # copy shard_*.parquet from an S3 prefix
    python -m nanochat.dataset --source /data/mytext      # a local dir of parquet/jsonl/txt files -> shards
    python -m nanochat.dataset --source sample            # offline: ~6 MB of real text from Python's own docs

Downloads run in parallel (-w workers) with a progress bar; each shard is retried with exponential backoff, written
to `<shard>.tmp` and renamed into place only after its parquet footer and `text` column check out, so a failed,
stalled or truncated transfer never leaves a shard that counts. Shards already present and valid are skipped.
Concurrent runs on one machine are safe: each shard is guarded by a file lock (`<shard>.lock`). The exit status is
1 when any shard failed, and every failure is listed at the end.

A data dir remembers its source (`SOURCE` file) and refuses to mix shards from different sources, because the val
shard is simply the last file by name.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from nanochat import storage
from nanochat.common import NanochatError, get_base_dir

# -----------------------------------------------------------------------------
# The specifics of the pretraining dataset (upstream's values)

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # the last shard, shard_06542.parquet, is the validation shard
ROW_GROUP_SIZE = 1024  # documents per row group; DDP ranks shard by row group
DATA_DIRNAME = "base_data_climbmix"
LEGACY_DIRNAME = "base_data"  # FineWeb-EDU shards of older nanochat versions
SOURCE_FILE = "SOURCE"


def index_to_filename(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir():
    """$NANOCHAT_BASE_DIR/base_data_climbmix (a local path or an s3:// URI)."""
    return storage.join(get_base_dir(), DATA_DIRNAME)


def __getattr__(name):
    # Upstream exposes DATA_DIR as a module constant; computing it lazily keeps imports free of side effects and
    # lets tests change NANOCHAT_BASE_DIR after import.
    if name == "DATA_DIR":
        return get_data_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -----------------------------------------------------------------------------
# Reading


def list_parquet_files(data_dir=None, warn_on_legacy=False):
    """Sorted full paths (or URIs) of the *.parquet shards in data_dir (default: the ClimbMix dir).

    Like upstream, a missing ClimbMix dir falls back to the legacy FineWeb-EDU dir `base_data/`.
    """
    if data_dir is None:
        data_dir = get_data_dir()
        if not storage.exists(data_dir):
            legacy = storage.join(get_base_dir(), LEGACY_DIRNAME)
            if storage.exists(legacy):
                if warn_on_legacy:
                    print(f"WARNING: {data_dir} not found; falling back to the legacy FineWeb-EDU shards in {legacy}. "
                          "Run `python -m nanochat.dataset -n 170` and re-train the tokenizer to switch to ClimbMix.")
                data_dir = legacy
    names = [n for n in storage.listdir(data_dir) if n.endswith(".parquet")]
    return [storage.join(data_dir, n) for n in names]


def open_parquet(path):
    """pq.ParquetFile for a local path or s3:// URI; NanochatError naming the file if it is not readable parquet."""
    try:
        if storage.is_remote(path):
            fs, inner = storage.get_filesystem(path)
            return pq.ParquetFile(fs.open_input_file(inner))
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise NanochatError(
            f"cannot read dataset shard {path}: {e}. The file is corrupt or truncated: delete it and run "
            "`python -m nanochat.dataset` again to fetch it (already-valid shards are skipped)."
        ) from e


def read_texts(pf, rg_idx, path="<parquet>"):
    """The documents of one row group as a list of str. Nulls become "" and a binary column is decoded as UTF-8
    with replacement, so odd rows never crash a training run."""
    try:
        table = pf.read_row_group(rg_idx, columns=["text"])
    except (OSError, pa.ArrowException, KeyError) as e:
        raise NanochatError(
            f"cannot read row group {rg_idx} of dataset shard {path}: {e}. Delete the file and run "
            "`python -m nanochat.dataset` again."
        ) from e
    column = table.column("text")
    values = column.to_pylist()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [v.decode("utf-8", "replace") if v is not None else "" for v in values]
    return [v if v is not None else "" for v in values]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the documents of each row group (a list of str) of the split, row groups start, start+step, ...

    split "train" = every shard but the last, "val" = the last one. Used by tokenizer training and evaluation.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = require_parquet_files(data_dir)
    paths = paths[:-1] if split == "train" else paths[-1:]
    for path in paths:
        pf = open_parquet(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield read_texts(pf, rg_idx, path)


def require_parquet_files(data_dir=None, warn_on_legacy=False):
    """list_parquet_files, but an empty result is a NanochatError that says how to get data."""
    paths = list_parquet_files(data_dir, warn_on_legacy=warn_on_legacy)
    if not paths:
        where = data_dir if data_dir is not None else get_data_dir()
        raise NanochatError(
            f"no dataset shards (*.parquet) found in {where}. Download some with `python -m nanochat.dataset -n 8`, "
            "or, offline, write the built-in sample corpus with `python -m nanochat.dataset --source sample`."
        )
    if len(paths) < 2:
        print(f"WARNING: only one shard in {storage.join(paths[0], '..')}: it is the val shard, so train is empty")
    return paths


def validate_parquet(path):
    """Check that path is a complete parquet file with a string `text` column; return its number of rows.

    Raises ValueError describing the problem. Reads only the footer (cheap).
    """
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"not a readable parquet file ({e})") from e
    if "text" not in schema.names:
        raise ValueError(f"no `text` column (columns: {schema.names})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        raise ValueError(f"`text` column has type {kind}, expected string")
    return meta.num_rows


def _is_valid(path):
    try:
        validate_parquet(path)
        return True
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# Writing shards (sample corpus and local text files)


def write_shard(docs, path, row_group_size=ROW_GROUP_SIZE):
    """Atomically write one shard in upstream's layout: `text` column, zstd, row groups of row_group_size docs."""
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd", compression_level=3,
                   use_dictionary=False, write_statistics=False)
    os.replace(tmp, path)


def write_shards(docs, data_dir, num_train_shards=-1, docs_per_shard=8 * ROW_GROUP_SIZE,
                 val_docs=2 * ROW_GROUP_SIZE, row_group_size=ROW_GROUP_SIZE):
    """Split docs into train shards of docs_per_shard plus a final val shard of the last val_docs documents.

    Deterministic: the same docs give byte-identical files. Existing valid shards are left alone. Returns the
    written paths (train shards, then the val shard). num_train_shards=-1 writes all train shards.
    """
    val_docs = min(val_docs, max(1, len(docs) // 10))
    train, val = docs[:-val_docs], docs[-val_docs:]
    chunks = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)]
    if num_train_shards >= 0:
        chunks = chunks[:num_train_shards]
    # Val is numbered after every possible train shard, so a later run with a larger -n still sorts it last.
    total_train = (len(train) + docs_per_shard - 1) // docs_per_shard
    names = [index_to_filename(i) for i in range(len(chunks))] + [index_to_filename(total_train)]
    paths = []
    for name, chunk in zip(names, chunks + [val]):
        path = os.path.join(data_dir, name)
        with FileLock(path + ".lock"):
            if not _is_valid(path):
                write_shard(chunk, path, row_group_size)
        paths.append(path)
    return paths


def _clean_text(text):
    # Parquet strings must be valid UTF-8 (lone surrogates from JSON escapes are not).
    return text.encode("utf-8", "replace").decode("utf-8")


def read_local_documents(src_dir):
    """Documents from a directory tree of *.parquet (`text` column), *.jsonl (`text` field per line) and *.txt
    (one document per file), visited in sorted relative-path order. Undecodable bytes become U+FFFD."""
    docs = []
    files = []
    for dirpath, dirnames, filenames in os.walk(src_dir):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in filenames]
    files = sorted(files, key=lambda p: os.path.relpath(p, src_dir))
    for path in files:
        if path.endswith(".parquet"):
            try:
                validate_parquet(path)
            except ValueError as e:
                raise NanochatError(f"{path}: {e}; local parquet sources need a `text` string column") from e
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                docs += [_clean_text(t) for t in read_texts(pf, rg, path)]
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        text = obj["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise NanochatError(f"{path}:{lineno}: expected a JSON object with a `text` field ({e})") from e
                    docs.append(_clean_text(str(text)))
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append(_clean_text(f.read()))
    if not docs:
        raise NanochatError(f"no documents found in {src_dir}: expected *.parquet, *.jsonl or *.txt files")
    return docs


# -----------------------------------------------------------------------------
# Fetching shards (HTTP and S3)


class FetchError(Exception):
    """One shard could not be fetched; the message says why (last error after all attempts)."""


def _http_fetch(url, tmp, timeout):
    """Stream url into tmp. Raises on HTTP errors, stalls (read timeout) and short bodies."""
    import requests

    with requests.get(url, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        expected = r.headers.get("Content-Length")
        written = 0
        with open(tmp, "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                written += len(chunk)
        if expected is not None and written != int(expected):
            raise OSError(f"truncated transfer: got {written} of {expected} bytes")


def _s3_fetch(uri, tmp, timeout):
    storage.download_to_local(uri, tmp)


def fetch_shard(src, path, fetch=_http_fetch, max_attempts=5, backoff_s=2.0, timeout=30.0, on_retry=None):
    """Fetch src (URL or s3:// URI) into the local file path, unless a valid copy is already there.

    Returns "skipped" or "fetched"; raises FetchError after max_attempts. Sleeps backoff_s * 2**(attempt-1)
    between attempts (2, 4, 8, 16 s by default, as upstream). The file lock makes concurrent runs wait for
    each other instead of writing the same .tmp.
    """
    with FileLock(path + ".lock"):
        if os.path.exists(path):
            if _is_valid(path):
                return "skipped"
            os.remove(path)  # a broken leftover (e.g. copied in by hand): fetch it again
        tmp = path + ".tmp"
        last = None
        for attempt in range(1, max_attempts + 1):
            try:
                fetch(src, tmp, timeout)
                try:
                    validate_parquet(tmp)
                except ValueError as e:
                    raise OSError(f"downloaded file is not a valid shard: {e}") from e
                os.replace(tmp, path)
                return "fetched"
            except Exception as e:  # noqa: BLE001 - every failure of one attempt is retried the same way
                last = f"{type(e).__name__}: {e}"
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                if attempt < max_attempts:
                    if on_retry is not None:
                        on_retry(attempt, last)
                    time.sleep(backoff_s * 2 ** (attempt - 1))
        raise FetchError(f"{src}: failed after {max_attempts} attempts, last error: {last}")


def download_single_file(index, base_url=BASE_URL, data_dir=None, **kwargs):
    """Upstream's helper: fetch shard `index` into the data dir; True on success (or already present)."""
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    name = index_to_filename(index)
    try:
        fetch_shard(f"{base_url}/{name}", os.path.join(data_dir, name), **kwargs)
        return True
    except FetchError as e:
        print(f"Failed to download {name}: {e}")
        return False


def fetch_shards(sources, data_dir, num_workers=4, fetch=_http_fetch, progress=True, **kwargs):
    """Fetch [(src, filename)] into data_dir in parallel. Returns (ok_paths, {filename: error message})."""
    from tqdm import tqdm

    os.makedirs(data_dir, exist_ok=True)
    ok, failed = [], {}
    bar = tqdm(total=len(sources), unit="shard", disable=not progress, file=sys.stdout, dynamic_ncols=True)

    def retry_note(name):
        return lambda attempt, err: bar.write(f"{name}: attempt {attempt} failed ({err}); retrying")

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        futures = {
            pool.submit(fetch_shard, src, os.path.join(data_dir, name), fetch=fetch, on_retry=retry_note(name),
                        **kwargs): name
            for src, name in sources
        }
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                fut.result()
                ok.append(os.path.join(data_dir, name))
            except FetchError as e:
                failed[name] = str(e)
                bar.write(f"FAILED {name}: {e}")
            bar.update(1)
    bar.close()
    return sorted(ok), failed


# -----------------------------------------------------------------------------
# Sources


def _check_source(data_dir, source_id):
    """Refuse to mix shards of different sources in one dir (the val shard is just the last file by name)."""
    marker = os.path.join(data_dir, SOURCE_FILE)
    existing = open(marker).read().strip() if os.path.exists(marker) else None
    has_shards = any(n.endswith(".parquet") for n in os.listdir(data_dir))
    if existing is None and has_shards:
        existing = "hf"  # shards from upstream nanochat, which writes no marker
    if existing is not None and has_shards and existing != source_id:
        raise NanochatError(
            f"{data_dir} already holds shards from source {existing!r}, not {source_id!r}. Mixing sources would make "
            "the wrong file the val shard: point NANOCHAT_BASE_DIR (or --data-dir) at another directory, or delete "
            "this one."
        )
    return source_id


def _mark_source(data_dir, source_id):
    marker = os.path.join(data_dir, SOURCE_FILE)
    with open(f"{marker}.tmp-{os.getpid()}", "w") as f:
        f.write(source_id + "\n")
    os.replace(f"{marker}.tmp-{os.getpid()}", marker)


def _shard_names(num_files, val_shard):
    n = val_shard if num_files == -1 else min(num_files, val_shard)
    return [index_to_filename(i) for i in range(n)] + [index_to_filename(val_shard)]


def _listed_shards(names, num_files, where):
    """First num_files shard files by name plus the last one (val), from a listing of a prefix/dir."""
    shards = sorted(n for n in names if n.startswith("shard_") and n.endswith(".parquet"))
    if not shards:
        raise NanochatError(f"no shard_*.parquet files under {where}")
    train = shards[:-1] if num_files == -1 else shards[:-1][:num_files]
    return train + [shards[-1]]


def download(source=None, num_files=-1, num_workers=4, data_dir=None, val_shard=MAX_SHARD, progress=True,
             **fetch_kwargs):
    """Populate data_dir from source. Returns (ok_paths, failures dict, wanted count). See the module docstring."""
    data_dir = data_dir or get_data_dir()
    source_id, ok, failed, wanted = _download(source or "hf", num_files, num_workers, data_dir, val_shard, progress,
                                              **fetch_kwargs)
    if ok:
        _mark_source(data_dir, source_id)
    return ok, failed, wanted


def _download(source, num_files, num_workers, data_dir, val_shard, progress, **fetch_kwargs):
    if storage.is_remote(data_dir):
        raise NanochatError(
            f"the data dir {data_dir} is on S3: download shards to a local dir and upload them with your S3 tool, "
            "or set NANOCHAT_BASE_DIR to a local path for this step"
        )
    os.makedirs(data_dir, exist_ok=True)
    if source == "hf" or source.startswith(("http://", "https://")):
        base = BASE_URL if source == "hf" else source.rstrip("/")
        sid = _check_source(data_dir, source)
        names = _shard_names(num_files, val_shard)
        print(f"Downloading {len(names)} shards using {num_workers} workers...")
        print(f"Target directory: {data_dir}")
        ok, failed = fetch_shards([(f"{base}/{n}", n) for n in names], data_dir, num_workers, progress=progress,
                                  **fetch_kwargs)
        return sid, ok, failed, len(names)
    if source.startswith("s3://"):
        sid = _check_source(data_dir, source)
        names = _listed_shards(storage.listdir(source), num_files, source)
        print(f"Copying {len(names)} shards from {source} using {num_workers} workers...")
        ok, failed = fetch_shards([(storage.join(source, n), n) for n in names], data_dir, num_workers,
                                  fetch=_s3_fetch, progress=progress, **fetch_kwargs)
        return sid, ok, failed, len(names)
    if source == "sample":
        from nanochat import sample_corpus

        sid = _check_source(data_dir, f"sample:{sample_corpus.python_tag()}")
        manifest = os.path.join(data_dir, f"SAMPLE_{sid.split(':')[1]}_n{num_files}.json")
        with FileLock(os.path.join(data_dir, ".sample.lock")):
            if os.path.exists(manifest):  # written before by this very request: skip the ~10 s corpus build
                with open(manifest) as f:
                    ok = [os.path.join(data_dir, n) for n in json.load(f)["shards"]]
                if all(_is_valid(p) for p in ok):
                    print(f"Sample corpus shards already present ({len(ok)} files)")
                    return sid, ok, {}, len(ok)
            docs = sample_corpus.build_documents()
            ok = write_shards(docs, data_dir, num_train_shards=num_files, docs_per_shard=4 * ROW_GROUP_SIZE)
            info = {"shards": [os.path.basename(p) for p in ok], "documents": len(docs),
                    "sha256": sample_corpus.corpus_fingerprint(docs)}
            with open(manifest + ".tmp", "w") as f:
                json.dump(info, f)
            os.replace(manifest + ".tmp", manifest)
        print(f"Sample corpus: {len(docs)} documents, {sum(len(d) for d in docs) / 1e6:.1f}M characters, "
              f"sha256 {info['sha256'][:16]}")
        return sid, ok, {}, len(ok)
    if os.path.isdir(source):
        src = os.path.abspath(source)
        sid = _check_source(data_dir, f"local:{src}")
        listing = sorted(os.listdir(src))
        if any(n.startswith("shard_") and n.endswith(".parquet") for n in listing):
            names = _listed_shards(listing, num_files, src)
            ok, failed = fetch_shards([(os.path.join(src, n), n) for n in names], data_dir, num_workers,
                                      fetch=lambda s, tmp, _t: shutil.copyfile(s, tmp), progress=progress,
                                      **fetch_kwargs)
            return sid, ok, failed, len(names)
        with FileLock(os.path.join(data_dir, ".local.lock")):
            ok = write_shards(read_local_documents(src), data_dir, num_train_shards=num_files)
        return sid, ok, {}, len(ok)
    raise NanochatError(
        f"unknown --source {source!r}: use 'hf' (default), 'sample', an http(s):// base URL, an s3:// prefix, "
        "or an existing local directory"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download pretraining dataset shards")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="number of train shards to fetch (-1 = all); the val shard is always fetched")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--source", default="hf",
                        help="hf (ClimbMix on HuggingFace) | sample (offline) | http(s)://base | s3://prefix | DIR")
    parser.add_argument("--data-dir", default=None, help="target dir (default: $NANOCHAT_BASE_DIR/base_data_climbmix)")
    parser.add_argument("--val-shard", type=int, default=MAX_SHARD, help="index of the val shard for HTTP sources")
    parser.add_argument("--max-attempts", type=int, default=5, help="attempts per shard")
    parser.add_argument("--backoff", type=float, default=2.0, help="seconds before the 1st retry, doubled each time")
    parser.add_argument("--timeout", type=float, default=30.0, help="connect/read timeout in seconds (a stall)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.num_files < -1 or args.num_workers < 1 or args.max_attempts < 1:
        parser.error("-n must be >= -1, -w >= 1 and --max-attempts >= 1")
    try:
        data_dir = args.data_dir or get_data_dir()
        ok, failed, wanted = download(args.source, args.num_files, args.num_workers, data_dir, args.val_shard,
                                      progress=not args.no_progress, max_attempts=args.max_attempts,
                                      backoff_s=args.backoff, timeout=args.timeout)
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Done! Downloaded: {len(ok)}/{wanted} shards to {data_dir}")
    if failed:
        print(f"{len(failed)} shard(s) failed (re-run the same command to retry just those):", file=sys.stderr)
        for name, err in sorted(failed.items()):
            print(f"  {name}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
