"""E2E NLG metrics: hand-computed mteval cases, the Java requirement, and the official tool's fixture scores.

The fixture scores (``../shared/data/e2e-metric-fixtures/expected_scores.json``) are what the official
``tuetschek/e2e-metrics`` printed (4 decimals); every metric must reproduce them exactly at that precision.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator

import pytest
import sacrebleu
from conftest import SHARED_DATA, requires_shared_data

from peftkit.eval import metrics
from peftkit.eval.e2e import E2EItem, load_e2e, read_e2e_csv
from peftkit.eval.metrics import (
    JAVA_METRICS,
    METRIC_NAMES,
    JavaRequiredError,
    MeteorScorer,
    bleu,
    cider,
    e2e_metrics,
    meteor,
    nist,
    ptb_tokenize,
    rouge_l,
    tokenize_13a,
)

FIXTURES = SHARED_DATA / "e2e-metric-fixtures"
SYSTEMS = ["sysA_template.txt", "sysB_perturbed_human.txt", "sysA_template_first50.txt"]
requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="no `java` on the PATH (METEOR, PTB)")
BETA = -math.log(0.5) / math.log(1.5) ** 2


# ---------------------------------------------------------------------------------------------------------
# mteval-v13a: tokenisation, BLEU, NIST on cases small enough to compute by hand
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Blue Spice is a coffee shop.", ["blue", "spice", "is", "a", "coffee", "shop", "."]),
        ("It's £20-25, 5.5 out of 5.", ["it's", "£20", "-", "25", ",", "5.5", "out", "of", "5", "."]),
        ("ÉCOLE Café", ["École", "café"]),  # mteval lowercases ASCII letters only (tr/[A-Z]/[a-z]/)
        ("a &amp; b&quot;  <skipped>c\nd", ["a", "&", "b", '"', "c", "d"]),
        ("  ", []),
    ],
)
def test_tokenize_13a(text: str, tokens: list[str]) -> None:
    assert tokenize_13a(text) == tokens


def test_bleu_perfect_and_brevity() -> None:
    refs = [["the eagle is a cheap pub near the river"]]
    assert bleu(["The Eagle is a cheap pub near the river"], refs) == pytest.approx(1.0)
    # all n-grams match, 4 of 9 words: BLEU = exp(1 - 9/4)
    assert bleu(["the eagle is a"], refs) == pytest.approx(math.exp(1 - 9 / 4))


def test_bleu_closest_reference_length_ties_go_to_the_shorter() -> None:
    # hypothesis of 3 words, references of 2 and 4 words: both at distance 1, the 2-word one counts (no BP)
    hyp = ["a b c"]
    assert bleu(hyp, [["a b c d", "a b"]]) == bleu(hyp, [["a b", "a b c d"]])
    # every n-gram matches; with the 4-word reference as length, BP would be exp(1 - 4/3)
    assert bleu(hyp, [["a b c d", "a b"]]) == pytest.approx(1.0)


def test_nist_by_hand() -> None:
    # one reference "a b c d": each unigram carries -log2(1/4) = 2 bits, each longer n-gram 0 bits
    assert nist(["a b c d"], [["a b c d"]]) == pytest.approx(2.0)
    # half the reference length: 2 bits per matched unigram, times exp(-beta * log(0.5)^2)
    assert nist(["a b"], [["a b c d"]]) == pytest.approx(2.0 * math.exp(-BETA * math.log(0.5) ** 2))


def test_nist_pools_information_over_all_references() -> None:
    # "x" occurs in 2 of the 8 reference words -> 2 bits; "y" in 1 of them -> 3 bits; "x y" follows "x" in
    # one of its two occurrences -> 1 bit. References of other inputs change the weights (NLTK would not).
    refs = [["x y z w"], ["x q r s"]]
    info_x, info_y, info_xy = 2.0, 3.0, 1.0
    # hypothesis words 2+2 = 4, reference words 8 over an average of 1 reference: ratio 0.5
    penalty = math.exp(-BETA * math.log(0.5) ** 2)
    expected = ((info_x + info_y + info_x) / 4 + info_xy / 2) * penalty
    assert nist(["x y", "x t"], refs) == pytest.approx(expected)


def test_nist_reference_length_uses_the_average_number_of_references() -> None:
    # The E2E tool's edit of mteval: reference length = reference words / average references per input.
    # Input 1: 2 references of 4 words; input 2: 1 reference of 4 words -> 12 words / 1.5 = 8 words, and
    # the 6 hypothesis words give a ratio of 0.75 (plain mteval would use 12 / 2 = 6 and no penalty).
    refs = [["a b c d", "a b c d"], ["e f g h"]]
    hyps = ["a b c", "e f g"]
    # a, b, c occur twice in the 12 reference words, e, f, g once; longer n-grams carry 0 bits
    score = (3 * math.log2(12 / 2) + 3 * math.log2(12 / 1)) / 6
    assert nist(hyps, refs) == pytest.approx(score * math.exp(-BETA * math.log(0.75) ** 2))


def test_nist_zero_bigram_prefix_quirk() -> None:
    # mteval tests the prefix string for truth, and Perl's "0" is false: a bigram after the token "0" is
    # weighted like a unigram, -log2(count / total words) = -log2(1/4) = 2 instead of -log2(1/2) = 1.
    refs = [["0 a", "0 b"]]
    expected = (1.0 + 2.0) / 2 + 2.0 / 1  # unigrams "0" (1 bit), "a" (2 bits); bigram "0 a" (2 bits)
    assert nist(["0 a"], refs) == pytest.approx(expected)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no references"):
        nist(["a"], [[]])
    with pytest.raises(ValueError, match="empty"):
        e2e_metrics([], [])
    with pytest.raises(TypeError):
        bleu("a b", [["a b"]])  # type: ignore[arg-type]


def test_rouge_and_cider_on_pretokenized_text_need_no_java() -> None:
    hyps, refs = ["the eagle is a pub"], [["the eagle is a pub", "a pub called the eagle"]]
    assert rouge_l(hyps, refs, tokenized=True) == pytest.approx(1.0)
    assert cider(hyps + ["a cafe"], refs + [["a cafe"]], tokenized=True) > 0


# ---------------------------------------------------------------------------------------------------------
# Without Java
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(metrics.shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name))


@pytest.mark.usefixtures("no_java")
def test_without_java_the_error_names_the_java_metrics() -> None:
    with pytest.raises(JavaRequiredError) as err:
        e2e_metrics(["a b"], [["a b"]])
    for name in JAVA_METRICS:
        assert name in str(err.value)
    assert "skip_java=True" in str(err.value)
    with pytest.raises(JavaRequiredError, match="METEOR"):
        MeteorScorer()
    with pytest.raises(JavaRequiredError, match="PTB"):
        ptb_tokenize(["a b"])


@pytest.mark.usefixtures("no_java")
def test_without_java_skip_java_returns_bleu_and_nist_and_says_why() -> None:
    with pytest.warns(UserWarning, match="METEOR, ROUGE_L, CIDEr skipped: they need Java"):
        scores = e2e_metrics(["a b c d"], [["a b c d"]], skip_java=True)
    assert set(scores) == {"BLEU", "NIST"}
    assert scores["BLEU"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# The official tool's numbers
# ---------------------------------------------------------------------------------------------------------


def _system(name: str) -> tuple[list[str], list[list[str]], dict[str, float]]:
    expected = json.loads((FIXTURES / "expected_scores.json").read_text(encoding="utf-8"))[name]
    items: list[E2EItem] = (
        read_e2e_csv(FIXTURES / expected["refs"]) if "first50" in expected["refs"] else load_e2e("test")
    )
    # The official tool reads one output per line and strips each line.
    outputs = [line.strip() for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]
    assert len(outputs) == len(items)
    return outputs, [item.refs for item in items], expected


def _assert_4_decimals(got: dict[str, float], expected: dict[str, float]) -> None:
    wrong = {k: (round(v, 6), expected[k]) for k, v in got.items() if round(v, 4) != pytest.approx(expected[k])}
    assert not wrong, f"(ours, official) differ at 4 decimals: {wrong}"


@requires_shared_data
@pytest.mark.parametrize("name", SYSTEMS)
def test_bleu_nist_match_official_mteval(name: str) -> None:
    outputs, refs, expected = _system(name)
    _assert_4_decimals({"BLEU": bleu(outputs, refs), "NIST": nist(outputs, refs)}, expected)


@requires_shared_data
@pytest.mark.parametrize("name", SYSTEMS[:2])
def test_bleu_matches_sacrebleu(name: str) -> None:
    outputs, refs, _ = _system(name)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
    expected = sacrebleu.corpus_bleu(outputs, streams, tokenize="13a", lowercase=True).score / 100
    assert bleu(outputs, refs) == pytest.approx(expected, abs=1e-9)


@pytest.fixture(scope="module")
def meteor_scorer() -> Iterator[MeteorScorer]:
    """One METEOR JVM for the whole module (starting it and loading the paraphrase table is the slow part)."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on the PATH (METEOR, PTB)")
    with MeteorScorer() as scorer:
        yield scorer


@requires_shared_data
@requires_java
@pytest.mark.parametrize("name", SYSTEMS[:2])
def test_coco_metrics_match_official(name: str, meteor_scorer: MeteorScorer) -> None:
    outputs, refs, expected = _system(name)
    hyps = ptb_tokenize(outputs)
    flat = ptb_tokenize([r for rs in refs for r in rs])
    tok_refs, start = [], 0
    for rs in refs:
        tok_refs.append(flat[start : start + len(rs)])
        start += len(rs)
    got = {
        "METEOR": meteor(hyps, tok_refs, tokenized=True, scorer=meteor_scorer),
        "ROUGE_L": rouge_l(hyps, tok_refs, tokenized=True),
        "CIDEr": cider(hyps, tok_refs, tokenized=True),
    }
    _assert_4_decimals(got, expected)


@requires_shared_data
@requires_java
def test_e2e_metrics_matches_official_on_first_50(meteor_scorer: MeteorScorer) -> None:
    # The first 50 MRs on their own: CIDEr's document frequencies and NIST's information weights come from
    # the references of the evaluated set, so these differ from the full-test-set scores of the same outputs.
    outputs, refs, expected = _system("sysA_template_first50.txt")
    scores = e2e_metrics(outputs, refs, meteor_scorer=meteor_scorer)
    assert list(scores) == list(METRIC_NAMES)
    _assert_4_decimals(scores, expected)


@requires_java
def test_ptb_tokenizer_lowercases_drops_punctuation_and_keeps_empty_lines() -> None:
    # coco's punctuation list spells brackets "-LRB-", but with -lowerCase the tokenizer writes "-lrb-",
    # so brackets survive (a quirk of the official pipeline, kept).
    assert ptb_tokenize(["Café £20-25, it's near.", "", "A (x)!"]) == [
        "café # 20-25 it 's near", "", "a -lrb- x -rrb-"
    ]


@requires_java
def test_e2e_metrics_handles_empty_outputs(meteor_scorer: MeteorScorer) -> None:
    refs = [["The Eagle is a cheap pub."], ["Blue Spice is a coffee shop."]]
    scores = e2e_metrics(["", ""], refs, meteor_scorer=meteor_scorer)
    assert scores == {name: 0.0 for name in METRIC_NAMES}
