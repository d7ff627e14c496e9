"""The E2E NLG Challenge metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr), computed as the official tool does.

The official evaluation (``tuetschek/e2e-metrics``, ``measure_scores.py``) runs two independent pipelines, and
so does this module:

* **BLEU and NIST** come from NIST's Perl ``mteval-v13a`` script. Both are ported here (:func:`bleu`,
  :func:`nist`) because no Python package reproduces mteval's NIST: it pools n-gram information over the
  whole reference set and measures brevity against the *average* reference length, where NLTK scores each
  reference separately. The port follows the E2E tool's copy of the script (see the Note): its 13a
  tokenisation with ASCII-only lowercasing (:func:`tokenize_13a`), BLEU with the closest reference length
  and its "exp" smoothing, NIST up to 5-grams. ``sacrebleu`` (``tokenize='13a', lowercase=True``) gives
  the same BLEU on E2E data and is used in the tests as a cross-check.
* **METEOR, ROUGE-L and CIDEr** come from the coco-caption code: every text is first tokenised and
  lowercased by Stanford's PTB tokenizer (a Java program) with punctuation tokens dropped; METEOR is
  METEOR 1.5 (a Java program, ``-l en -norm``), ROUGE-L is coco's LCS F-measure with beta 1.2 averaged over
  inputs, CIDEr is coco's CIDEr-D with document frequencies taken from the references of the evaluated
  set. The jars and the pure-Python ROUGE-L/CIDEr scorers are the ones ``pycocoevalcap`` ships.

Java is therefore needed for METEOR, ROUGE_L and CIDEr (:data:`JAVA_METRICS`). Without a ``java``
executable, :func:`e2e_metrics` raises :class:`JavaRequiredError`, which names those metrics; with
``skip_java=True`` it returns BLEU and NIST only and warns which metrics were left out and why.

Note:
    The E2E tool bundles an *edited* mteval (``mteval-v13a-sig.pl``) for a variable number of references
    per input: it pads inputs with fewer references than the maximum with empty ones, and NIST's brevity
    penalty divides the total reference length by the *average number of non-empty references per input*
    (plain mteval divides by the number of reference sets, i.e. the maximum, 45 on the E2E test set,
    which would switch the penalty off). That edit is reproduced here; the padding changes nothing else
    (empty references carry no n-grams and are skipped when looking for the closest reference length).
    The tool reads one system output per line, so an output never contains a line break; here any line
    break inside a text counts as a space, as it does in mteval's SGML reader.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from peftkit.train.evaluation import register_metric

__all__ = [
    "JAVA_METRICS",
    "METRIC_NAMES",
    "JavaRequiredError",
    "MeteorScorer",
    "bleu",
    "cider",
    "e2e_metrics",
    "java_available",
    "meteor",
    "nist",
    "ptb_tokenize",
    "rouge_l",
    "tokenize_13a",
]

METRIC_NAMES: tuple[str, ...] = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
"""Keys of :func:`e2e_metrics`' result, in the order the official script prints them."""

JAVA_METRICS: tuple[str, ...] = ("METEOR", "ROUGE_L", "CIDEr")
"""Metrics that need Java: METEOR runs a Java program, ROUGE-L and CIDEr need the Java PTB tokenizer."""


class JavaRequiredError(RuntimeError):
    """Raised when a metric that needs Java is asked for and no working ``java`` is found."""


# --------------------------------------------------------------------------------------------------------
# BLEU and NIST: a port of mteval-v13a (the "-sig" variant the E2E tool bundles scores the same way)
# --------------------------------------------------------------------------------------------------------

# Perl's \s on character strings (mteval reads its files as UTF-8): a narrower set than Python's str.split(),
# which also splits on the ASCII separators \x1c-\x1f.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN = re.compile(f"[{_WS}]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash when preceded by a digit
)
_NIST_MAX_N = 5
_BLEU_MAX_N = 4


def tokenize_13a(text: str) -> list[str]:
    """Tokenise and lowercase one text as ``mteval-v13a.pl`` does by default.

    Args:
        text: One system output or reference.

    Returns:
        The tokens.

    Note:
        mteval lowercases with ``tr/[A-Z]/[a-z]/``, i.e. ASCII letters only ("É" stays "É"), where
        ``sacrebleu``'s ``lowercase=True`` uses Unicode lowercasing; the two differ only on non-ASCII
        capitals (none occur in the E2E data). Whitespace runs are collapsed first, as mteval's SGML reader
        does before tokenising, so its end-of-line hyphen rule never applies.
    """
    text = _WS_RUN.sub(" ", text)
    text = text.replace("<skipped>", "")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} ".translate(_ASCII_LOWER)
    for pattern, repl in _13A_RULES:
        text = pattern.sub(repl, text)
    return [tok for tok in _WS_RUN.split(text) if tok]


def _ngrams(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """All n-grams of ``words`` for n = 1..max_n, with counts."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or any(isinstance(refs, str) for refs in references):
        raise TypeError("predictions must be a list of strings and references a list of lists of strings")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "there must be one list of references per prediction"
        )
    if not predictions:
        raise ValueError("nothing to score: predictions is empty")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise ValueError(f"inputs {empty[:10]} have no references; each prediction needs at least one")


def _ngram_info(references: Sequence[Sequence[list[str]]]) -> dict[tuple[str, ...], float]:
    """mteval's information weight of each reference n-gram (n <= 5), pooled over all references.

    ``info(w_1..w_n) = -log2(count(w_1..w_n) / count(w_1..w_{n-1}))``, and ``-log2(count(w) / total words)``
    for unigrams, with counts over every reference of every input.
    """
    counts: Counter[tuple[str, ...]] = Counter()
    total_words = 0
    for refs in references:
        for words in refs:
            total_words += len(words)
            counts.update(_ngrams(words, _NIST_MAX_N))
    info = {}
    for ngram, count in counts.items():
        prefix = ngram[:-1]
        # Perl's `$mgram ? ... : ...` treats the prefix string "0" as false: a bigram starting with the
        # token "0" is weighted like a unigram. Reproduced to match the official numbers exactly.
        if not prefix or prefix == ("0",):
            info[ngram] = -math.log(count / total_words) / math.log(2)
        else:
            info[ngram] = -math.log(count / counts[prefix]) / math.log(2)
    return info


def _closest_ref_length(current: int, ref_len: int, hyp_len: int) -> int:
    """mteval's ``brevity_penalty_closest``: empty references are skipped, ties go to the shorter one."""
    if ref_len == 0:
        return current
    if abs(hyp_len - ref_len) < abs(hyp_len - current):
        return ref_len
    if abs(hyp_len - ref_len) == abs(hyp_len - current):
        return min(current, ref_len)
    return current


def _mteval_stats(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[int, int, list[int], list[int], list[int], list[float]]:
    """Corpus statistics as the E2E tool's mteval (``score_segment``, ``score_document``) accumulates them.

    Returns:
        ``(n_refs, ref_length, match, hyp_count, ref_count, hyp_info)``: the number of non-empty references
        over all inputs, the sum of closest reference lengths, and per n (index n, 1..5) the clipped n-gram
        matches, the hypothesis n-grams, the reference n-grams and the information of the matched n-grams.
    """
    _check_inputs(predictions, references)
    hyps = [tokenize_13a(p) for p in predictions]
    refs = [[tokenize_13a(r) for r in rs] for rs in references]
    info = _ngram_info(refs)
    size = _NIST_MAX_N + 1
    match, hyp_count, ref_count = [0] * size, [0] * size, [0] * size
    hyp_info = [0.0] * size
    ref_length = n_refs = 0
    for hyp, seg_refs in zip(hyps, refs, strict=True):
        for n in range(1, size):
            hyp_count[n] += max(len(hyp) - n + 1, 0)
        ref_max: dict[tuple[str, ...], int] = {}
        seg_ref_length: int | None = None
        for words in seg_refs:
            n_refs += bool(words)  # the edit: count the references that are not empty
            for ngram, count in _ngrams(words, _NIST_MAX_N).items():
                ref_max[ngram] = max(ref_max.get(ngram, 0), count)
            for n in range(1, size):
                ref_count[n] += max(len(words) - n + 1, 0)
            if seg_ref_length is None:
                seg_ref_length = len(words)
            else:
                seg_ref_length = _closest_ref_length(seg_ref_length, len(words), len(hyp))
        ref_length += seg_ref_length or 0
        for ngram, count in _ngrams(hyp, _NIST_MAX_N).items():
            if ngram in ref_max:
                clipped = min(count, ref_max[ngram])
                match[len(ngram)] += clipped
                hyp_info[len(ngram)] += info[ngram] * clipped
    return n_refs, ref_length, match, hyp_count, ref_count, hyp_info


def _bleu_from_stats(ref_length: int, match: Sequence[int], hyp_count: Sequence[int]) -> float:
    """mteval's ``bleu_score``: corpus BLEU-4, closest-length brevity penalty, "exp" smoothing of zeros."""
    if hyp_count[1] == 0:
        return 0.0
    log_bp = min(0.0, 1.0 - ref_length / hyp_count[1])
    log_prec_sum, smooth = 0.0, 1
    for n in range(1, _BLEU_MAX_N + 1):
        if hyp_count[n] == 0:
            continue  # mteval adds log(1) = 0 for an order with no hypothesis n-grams
        if match[n] == 0:
            smooth *= 2
            log_prec_sum += math.log(1.0 / (smooth * hyp_count[n]))
        else:
            log_prec_sum += math.log(match[n] / hyp_count[n])
    return math.exp(log_prec_sum / _BLEU_MAX_N) * math.exp(log_bp)


def _nist_length_penalty(ratio: float) -> float:
    """mteval's NIST brevity penalty: 1 for ``ratio >= 1``, else ``exp(-beta * log(ratio)^2)``.

    beta comes from the anchors ``ratio_x = 1.5, score_x = 0.5``: ``beta = -log(0.5) / log(1.5)^2``, so a
    hypothesis 2/3 as long as the average reference gets a penalty of 0.5.
    """
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)
    return math.exp(-beta * math.log(ratio) * math.log(ratio))


def _nist_from_stats(
    n_inputs: int, n_refs: int, hyp_count: Sequence[int], ref_count: Sequence[int], hyp_info: Sequence[float]
) -> float:
    """mteval's ``nist_score`` with n up to 5: summed information per hypothesis n-gram, times brevity.

    The reference length is the total number of reference words divided by the average number of
    non-empty references per input (the E2E tool's edit of mteval, see the module note).
    """
    score = sum(hyp_info[n] / max(hyp_count[n], 1) for n in range(1, _NIST_MAX_N + 1))
    if n_refs == 0 or ref_count[1] == 0:
        return 0.0  # mteval divides by zero here; only possible when every reference is empty
    ref_words = ref_count[1] / (n_refs / n_inputs)
    return score * _nist_length_penalty(hyp_count[1] / ref_words)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as ``mteval-v13a.pl`` computes it (13a tokenisation, lowercased).

    Args:
        predictions: One system output per input.
        references: For each input, its references (any number, at least one).

    Returns:
        BLEU as a fraction in [0, 1] (the official E2E script prints it this way, not as a percentage).
    """
    _, ref_length, match, hyp_count, _, _ = _mteval_stats(predictions, references)
    return _bleu_from_stats(ref_length, match, hyp_count)


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus NIST (n up to 5) as ``mteval-v13a.pl`` computes it (13a tokenisation, lowercased).

    ``NIST = sum_{n=1..5} [sum of info(g) over matched hypothesis n-grams g] / [hypothesis n-grams]
    * exp(-beta * log(min(1, L_hyp / L_ref))^2)``, where ``info`` is pooled over all references of all
    inputs (:func:`_ngram_info`), ``L_hyp`` is the number of hypothesis words and ``L_ref`` the number of
    reference words divided by the average number of references per input.

    Args:
        predictions: One system output per input.
        references: For each input, its references (any number, at least one).

    Returns:
        The NIST score (unbounded above; around 5-10 on E2E).
    """
    n_refs, _, _, hyp_count, ref_count, hyp_info = _mteval_stats(predictions, references)
    return _nist_from_stats(len(predictions), n_refs, hyp_count, ref_count, hyp_info)


# --------------------------------------------------------------------------------------------------------
# The coco-caption side: PTB tokenisation, METEOR 1.5, ROUGE-L, CIDEr-D
# --------------------------------------------------------------------------------------------------------

_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (METEOR, ROUGE_L and CIDEr need one)."""
    return shutil.which("java") is not None


def _require_java(what: str) -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaRequiredError(
            f"{what} needs Java, and no `java` executable was found on the PATH. METEOR runs the METEOR 1.5 "
            "jar, and ROUGE_L and CIDEr (like METEOR) score text tokenised by Stanford's Java PTB tokenizer, "
            "both shipped by pycocoevalcap. Install a Java runtime (8 or newer), or call "
            "e2e_metrics(..., skip_java=True) to compute BLEU and NIST only."
        )
    return java


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap  # a namespace package: locate it through __path__

    return Path(next(iter(pycocoevalcap.__path__)))


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenise and lowercase texts with Stanford's PTB tokenizer and drop punctuation, as coco-caption does.

    Runs ``java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer -preserveLines
    -lowerCase`` (the jar ``pycocoevalcap`` ships) on one text per line, then removes the tokens in
    ``pycocoevalcap``'s punctuation list. E.g. ``"Café £20-25, it's near."`` -> ``"café # 20-25 it 's near"``.
    Brackets survive as ``-lrb-``/``-rrb-``: the list spells them in upper case, the tokenizer writes them
    lowercased (a quirk of the official pipeline, kept).

    Args:
        texts: The texts; any line break inside one is replaced by a space (coco does so for ``\\n``).

    Returns:
        One space-joined tokenised text per input text.

    Raises:
        JavaRequiredError: No ``java`` on the PATH.
        RuntimeError: The tokenizer failed or returned a different number of lines.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    java = _require_java("PTB tokenisation (used by METEOR, ROUGE_L and CIDEr)")
    if not texts:
        return []
    jar = _pycocoevalcap_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    punctuation = set(PUNCTUATIONS)
    with tempfile.TemporaryDirectory(prefix="peftkit-ptb-") as tmp:
        # A file in our own temp dir: pycocoevalcap writes its temp file next to the jar, which fails on a
        # read-only install. UTF-8 is forced so that the result does not depend on the locale.
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(_LINE_BREAKS.sub(" ", t) for t in texts), encoding="utf-8")
        cmd = [java, "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts) or any(lines[len(texts):]):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(texts)]]


class MeteorScorer:
    """A running METEOR 1.5 process (``java -jar meteor-1.5.jar - - -stdio -l en -norm``), as coco-caption uses it.

    Starting the JVM and loading the paraphrase table takes seconds, so one scorer can serve many calls;
    close it (or use it as a context manager) when done.

    Args:
        max_heap: The JVM's ``-Xmx`` (coco-caption uses 2G).

    Raises:
        JavaRequiredError: No ``java`` on the PATH.
    """

    def __init__(self, max_heap: str = "2G") -> None:
        java = _require_java("METEOR")
        meteor_dir = _pycocoevalcap_dir() / "meteor"
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [java, "-Dfile.encoding=UTF-8", f"-Xmx{max_heap}", "-jar", "meteor-1.5.jar",
             "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )

    def _ask(self, line: str) -> str:
        if self._proc.poll() is not None or self._proc.stdin is None or self._proc.stdout is None:
            raise RuntimeError(f"METEOR is not running{self._stderr_tail()}")
        self._proc.stdin.write((line + "\n").encode("utf-8"))
        self._proc.stdin.flush()
        return self._read()

    def _read(self) -> str:
        assert self._proc.stdout is not None
        out = self._proc.stdout.readline().decode("utf-8").strip()
        if not out:
            raise RuntimeError(f"METEOR stopped answering{self._stderr_tail()}")
        return out

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", errors="replace")[-2000:]
        return f": {tail}" if tail else ""

    def score(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus METEOR of already PTB-tokenised texts (coco-caption's protocol).

        Each input's statistics come from a ``SCORE ||| ref ||| ... ||| hyp`` line; one ``EVAL`` line with
        all of them gives per-input scores and then the corpus score, which is returned.
        """
        _check_inputs(predictions, references)
        stats = []
        for hyp, refs in zip(predictions, references, strict=True):
            hyp = hyp.replace("|||", "").replace("  ", " ")
            stats.append(self._ask(" ||| ".join(("SCORE", " ||| ".join(refs), hyp))))
        self._ask("EVAL ||| " + " ||| ".join(stats))  # the first answer is the first input's score
        for _ in range(len(predictions) - 1):
            self._read()
        return float(self._read())

    def close(self) -> None:
        """Stop the METEOR process."""
        if self._proc.poll() is None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _coco_dicts(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [hyp] for i, hyp in enumerate(predictions)}
    return gts, res


def _tokenize_all(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """PTB-tokenise references and predictions (two runs, like coco-caption's two ``tokenize`` calls)."""
    flat = ptb_tokenize([r for refs in references for r in refs])
    tok_refs, start = [], 0
    for refs in references:
        tok_refs.append(flat[start : start + len(refs)])
        start += len(refs)
    return ptb_tokenize(predictions), tok_refs


def meteor(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenized: bool = False,
    scorer: MeteorScorer | None = None,
) -> float:
    """Corpus METEOR 1.5 as coco-caption computes it (PTB-tokenised, lowercased, ``-l en -norm``).

    Args:
        predictions: One system output per input.
        references: For each input, its references.
        tokenized: The texts are already the output of :func:`ptb_tokenize`.
        scorer: A running :class:`MeteorScorer` to reuse; by default one is started and stopped.

    Returns:
        METEOR in [0, 1].
    """
    _check_inputs(predictions, references)
    if not tokenized:
        predictions, references = _tokenize_all(predictions, references)
    if scorer is not None:
        return scorer.score(predictions, references)
    with MeteorScorer() as own:
        return own.score(predictions, references)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenized: bool = False) -> float:
    """ROUGE-L as coco-caption computes it: per input, LCS F-measure (beta 1.2) against the best
    precision and best recall over its references, averaged over inputs.

    Args:
        predictions: One system output per input.
        references: For each input, its references.
        tokenized: The texts are already the output of :func:`ptb_tokenize` (then no Java is needed).

    Returns:
        ROUGE-L in [0, 1].
    """
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(predictions, references)
    if not tokenized:
        predictions, references = _tokenize_all(predictions, references)
    score, _ = Rouge().compute_score(*_coco_dicts(predictions, references))
    return float(score)


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenized: bool = False) -> float:
    """CIDEr-D as coco-caption computes it (n up to 4, sigma 6, clipped, times 10).

    Document frequencies come from the references of the inputs being scored, so the score of one
    output depends on the whole evaluated set (scoring the first 50 test MRs differs from scoring all 630).

    Args:
        predictions: One system output per input.
        references: For each input, its references.
        tokenized: The texts are already the output of :func:`ptb_tokenize` (then no Java is needed).

    Returns:
        CIDEr (around 0-10; about 2-3 for good E2E systems).
    """
    from pycocoevalcap.cider.cider import Cider

    _check_inputs(predictions, references)
    if not tokenized:
        predictions, references = _tokenize_all(predictions, references)
    score, _ = Cider().compute_score(*_coco_dicts(predictions, references))
    return float(score)


def e2e_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    skip_java: bool = False,
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, float]:
    """All five E2E NLG metrics, as the official ``measure_scores.py`` computes and prints them.

    Args:
        predictions: One system output per input (e.g. per test MR).
        references: For each input, its references (any number, at least one).
        skip_java: Without Java, return BLEU and NIST only (with a warning naming what was skipped and why)
            instead of raising :class:`JavaRequiredError`. Ignored when Java is available.
        meteor_scorer: A running :class:`MeteorScorer` to reuse across calls (saves the JVM start).

    Returns:
        ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` -> score; BLEU is a fraction in [0, 1].

    Raises:
        JavaRequiredError: No ``java`` on the PATH and ``skip_java`` is false.
        ValueError: The inputs do not pair up (see :func:`bleu`).

    Example:
        >>> e2e_metrics(["The Eagle is a cheap pub."],
        ...             [["The Eagle is a cheap pub.", "A low-priced pub, The Eagle."]])  # doctest: +SKIP
    """
    _check_inputs(predictions, references)
    n_refs, ref_length, match, hyp_count, ref_count, hyp_info = _mteval_stats(predictions, references)
    scores = {
        "BLEU": _bleu_from_stats(ref_length, match, hyp_count),
        "NIST": _nist_from_stats(len(predictions), n_refs, hyp_count, ref_count, hyp_info),
    }
    if not java_available():
        if not skip_java:
            _require_java(", ".join(JAVA_METRICS))
        warnings.warn(
            f"{', '.join(JAVA_METRICS)} skipped: they need Java (METEOR 1.5 and Stanford's PTB tokenizer are "
            "Java programs) and no `java` executable is on the PATH; only BLEU and NIST were computed",
            stacklevel=2,
        )
        return scores
    hyps, refs = _tokenize_all(predictions, references)
    scores["METEOR"] = meteor(hyps, refs, tokenized=True, scorer=meteor_scorer)
    scores["ROUGE_L"] = rouge_l(hyps, refs, tokenized=True)
    scores["CIDEr"] = cider(hyps, refs, tokenized=True)
    return {name: scores[name] for name in METRIC_NAMES}


def _bleu_metric(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"bleu": bleu(predictions, [[r] for r in references])}


def _rouge_l_metric(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"rouge_l": rouge_l(predictions, [[r] for r in references])}


# `eval_metric: bleu` / `rouge_l` while training (one reference each); training never imports eval
register_metric("bleu", _bleu_metric, ("bleu",))
register_metric("rouge_l", _rouge_l_metric, ("rouge_l",))
