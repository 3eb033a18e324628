"""
Compression of our tokenizer (bytes per token) on a few kinds of text, compared with GPT-2 and GPT-4 (cl100k_base).

    python -m ray_jobs.tok_eval                   # a corrupt dataset shard is an error (exit 2)
    python -m ray_jobs.tok_eval --skip-corrupt    # ... or skipped with a message (exit 0)

Texts: short samples of news prose, Korean, Python code, LaTeX math and science prose, plus the first row group of
the first train shard and of the val shard (when shards exist; no shards at all is a skip, not an error). Every
text must decode back to itself.
The GPT-2 / GPT-4 encodings come from tiktoken, which downloads them once into its cache (TIKTOKEN_CACHE_DIR).
Without a network and without that cache, each comparison prints 'skipped: encoding not available offline'.
Runs in one process: it is a few seconds of encoding, so there is nothing to distribute.
"""

import argparse
import socket
import sys

from nanochat.common import NanochatError
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

BASELINES = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]
DOWNLOAD_TIMEOUT_S = 10  # a firewalled (not just DNS-less) machine would otherwise hang on the download

NEWS_TEXT = """
GENEVA, March 3 (Wire) - Ministers from 41 countries agreed late on Tuesday to a framework for sharing river water
during droughts, ending talks that had stalled twice since 2023. The deal sets out how upstream states notify
neighbours before opening or closing dams, and it creates a 12-member panel to settle disputes within 90 days.
"It's not everything we wanted, but it's a start," said one delegate, who asked not to be named. Farmers' groups
welcomed the accord; environmental organisations said the targets were "too little, too late" and vowed to keep
pressing for binding limits. The agreement takes effect once 25 parliaments have ratified it.
""".strip()

KOREAN_TEXT = """
서울의 봄은 짧지만 아름답다. 사월이 되면 한강을 따라 벚꽃이 피고, 사람들은 주말마다 공원으로 나들이를 간다.
최근 조사에 따르면 시민의 절반 이상이 가까운 곳에서 산책하는 것을 가장 좋아하는 여가 활동으로 꼽았다.
전문가들은 도시 안의 녹지가 정신 건강에도 도움이 된다고 말한다.
""".strip()

CODE_TEXT = '''
def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping closed intervals; the result is sorted by start."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


if __name__ == "__main__":
    assert merge_intervals([(1, 3), (2, 6), (8, 10), (15, 18)]) == [(1, 6), (8, 10), (15, 18)]
    print({"ok": True, "count": len(merge_intervals([(0, 1)]))})
'''.strip()

MATH_TEXT = r"""
\begin{theorem}[Geometric series]
For every real $r$ with $|r| < 1$,
\[
  \sum_{k=0}^{\infty} r^{k} = \frac{1}{1-r}.
\]
\end{theorem}
\begin{proof}
Let $S_n = \sum_{k=0}^{n} r^k$. Then $S_n - r S_n = 1 - r^{n+1}$, so $S_n = \frac{1 - r^{n+1}}{1 - r}$.
Since $|r| < 1$, $r^{n+1} \to 0$ as $n \to \infty$, hence $\lim_{n\to\infty} S_n = \frac{1}{1-r}$. \qedhere
\end{proof}
""".strip()

SCIENCE_TEXT = """
Nitrogen fixation converts atmospheric N₂ into ammonia (NH₃), a form that plants can assimilate. In legumes the
reaction is carried out by rhizobia living in root nodules, where the enzyme nitrogenase reduces N₂ using ATP and
electrons supplied by ferredoxin; about 16 ATP are hydrolysed per molecule of N₂ fixed. Because nitrogenase is
irreversibly inactivated by O₂, nodules keep free oxygen low with leghaemoglobin while still supporting aerobic
respiration — a balance that makes symbiotic fixation one of the most energy-intensive processes in the biosphere.
""".strip()

OUR_TEXTS = [("news", NEWS_TEXT), ("korean", KOREAN_TEXT), ("code", CODE_TEXT), ("math", MATH_TEXT),
             ("science", SCIENCE_TEXT)]  # fmt: skip

GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"


def shard_texts(skip_corrupt: bool = False) -> list[tuple[str, str]]:
    """First row group of the first train shard and of the val shard, each joined into one text. A shard that
    cannot be read raises its NanochatError, unless skip_corrupt (then it is skipped with a message)."""
    from nanochat.dataset import list_parquet_files, parquets_iter_batched

    if not list_parquet_files():
        print("shards: skipped (no dataset shards: python -m nanochat.dataset -n 2)")
        return []
    texts = []
    for split in ("train", "val"):
        try:
            docs = next(parquets_iter_batched(split=split), [])
        except NanochatError as e:
            if not skip_corrupt:
                raise NanochatError(f"{e} (or pass --skip-corrupt to evaluate without it)") from e
            print(f"shard-{split}: SKIPPED because of --skip-corrupt: {e}")
            continue
        if docs:
            texts.append((f"shard-{split}", "\n".join(docs)))
        else:
            print(f"shard-{split}: skipped (the {split} split has no shards: python -m nanochat.dataset -n 2)")
    return texts


def load_baseline(tiktoken_name: str) -> RustBPETokenizer | None:
    """tiktoken's named encoding, or None (with a printed reason) when it cannot be had offline."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return RustBPETokenizer.from_pretrained(tiktoken_name)
    except (OSError, ValueError) as e:  # requests' ConnectionError/Timeout are OSErrors; ValueError: bad hash
        print(f"{tiktoken_name}: skipped: encoding not available offline ({type(e).__name__})")
        return None
    finally:
        socket.setdefaulttimeout(previous)


def measure(tokenizer: RustBPETokenizer, texts: list[tuple[str, str]]) -> dict:
    results = {}
    for name, text in texts:
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            raise AssertionError(f"{name}: decode(encode(text)) != text")
        n_bytes = len(text.encode("utf-8"))
        results[name] = {"bytes": n_bytes, "tokens": len(ids), "ratio": n_bytes / max(len(ids), 1)}
    return results


def print_ours(results: dict) -> None:
    print("\nOur tokenizer:")
    print(f"{'Text Type':<12} {'Bytes':<8} {'Tokens':<8} {'Ratio':<7}")
    print("-" * 38)
    for name, r in results.items():
        print(f"{name:<12} {r['bytes']:<8} {r['tokens']:<8} {r['ratio']:<7.2f}")


def print_comparison(label: str, base: dict, ours: dict) -> None:
    """Tokens and bytes/token side by side; 'Diff %' > 0 means we need fewer tokens than the baseline."""
    print(f"\nComparison with {label}:")
    print("=" * 97)
    print(f"{'Text Type':<12} {'Bytes':<8} {label:<15} {'Ours':<15} {'Relative':<12} {'Better':<10}")
    print(f"{'':12} {'':8} {'Tokens':<7} {'Ratio':<7} {'Tokens':<7} {'Ratio':<7} {'Diff %':<12}")
    print("-" * 97)
    for name, b in base.items():
        o = ours[name]
        diff = (b["tokens"] - o["tokens"]) / max(b["tokens"], 1) * 100
        if b["ratio"] > o["ratio"]:
            bc, oc, better = GREEN, RED, label
        elif o["ratio"] > b["ratio"]:
            bc, oc, better = RED, GREEN, "Ours"
        else:
            bc, oc, better = "", "", "Tie"
        print(
            f"{name:<12} {b['bytes']:<8} {bc}{b['tokens']:<7}{RESET} {bc}{b['ratio']:<7.2f}{RESET} "
            f"{oc}{o['tokens']:<7}{RESET} {oc}{o['ratio']:<7.2f}{RESET} {oc}{diff:+7.1f}%{RESET}     {better:<10}"
        )


def main(skip_corrupt: bool = False) -> dict:
    """Returns {"vocab_sizes": {label: n}, "results": {label: {text: {bytes, tokens, ratio}}}}."""
    ours = get_tokenizer()
    texts = OUR_TEXTS + shard_texts(skip_corrupt)
    results = {"Ours": measure(ours, texts)}
    vocab_sizes = {"Ours": ours.get_vocab_size()}
    for label, name in BASELINES:
        baseline = load_baseline(name)
        if baseline is not None:
            vocab_sizes[label] = baseline.get_vocab_size()
            results[label] = measure(baseline, texts)

    print("\nVocab sizes:")
    for label, n in vocab_sizes.items():
        print(f"{label}: {n}")
    print_ours(results["Ours"])
    for label, _ in BASELINES:
        if label in results:
            print_comparison(label, results[label], results["Ours"])
    return {"vocab_sizes": vocab_sizes, "results": results}


def cli(argv: list[str] | None = None) -> int:
    """`python -m ray_jobs.tok_eval [--skip-corrupt]`; argv None = no flags (callers in Python), not sys.argv."""
    parser = argparse.ArgumentParser(description="Compression of our tokenizer vs GPT-2 / GPT-4")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="skip a dataset shard that cannot be read (with a message) instead of failing")
    args = parser.parse_args([] if argv is None else argv)
    try:
        main(skip_corrupt=args.skip_corrupt)
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
