"""Commonsense multiple-choice tasks: loading, option parsing, client partitioning.

Records follow the LLM-Adapters layout (see ``resources/commonsense/README.md``).
The options live inside the instruction text, so we parse them back out: the model
code scores each option text, and a record we cannot parse is rejected loudly (one
line naming file, record index, field and value) rather than silently skipped.

Only numpy is needed here, so data problems surface before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "DataError",
    "Question",
    "Task",
    "packaged_data_dir",
    "parse_record",
    "load_task",
    "load_tasks",
    "partition",
    "subsample",
]

# First-line boilerplate of the LLM-Adapters templates; only these are stripped, so a
# question that merely contains ": " (HellaSwag's "Removing ice from car: ...") is kept.
KNOWN_PREFIXES = (
    "Please choose the correct answer to the question",  # ARC, OBQA, SIQA
    "Please choose the correct solution to the question",  # PIQA
    "Please choose the correct ending to complete the given sentence",  # HellaSwag
    "Please choose the correct answer to fill in the blank to complete the given sentence",  # WinoGrande
    "Please answer the following question with true or false, question",  # BoolQ
)

_FORMAT_RE = re.compile(r"(?:^|\n)[ \t]*Answer format:[ \t]*([^\n]*?)[ \t]*\s*$")
_NUMBERED_RE = re.compile(r"[a-z]+\d+")
_MAX_REPR = 80


class DataError(ValueError):
    """Bad data or data arguments; the message is one line naming what and where."""


@dataclass(frozen=True)
class Question:
    task: str
    text: str
    options: tuple[str, ...]
    label: int  # 0-based index of the correct option


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple[Question, ...]
    test: tuple[Question, ...]
    train_carved_from_test: bool  # True when the folder had only test.json
    source: str  # folder path as string


def packaged_data_dir() -> Path:
    """The commonsense folder shipped inside the package (works from an install, not just a checkout)."""
    return Path(str(resources.files("fedlora") / "resources" / "commonsense"))


def _short(value: object) -> str:
    """repr() of the value, long strings cut to head ... tail, so the message stays one readable line."""
    if isinstance(value, str):
        half = _MAX_REPR // 2
        return repr(value) if len(value) <= _MAX_REPR else f"{value[:half]!r} ... {value[-half:]!r}"
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR] + "..."


def _fail(file: str, index: int, field: str, value: object, problem: str) -> DataError:
    return DataError(f"{file}: record {index}: field {field!r}: value {_short(value)} {problem}")


def _strip_prefix(question: str) -> str:
    head, sep, rest = question.partition(": ")
    if sep and "\n" not in head and head.strip() in KNOWN_PREFIXES:
        return rest.strip()
    return question.strip()


def parse_record(record: dict, *, task: str, file: str, index: int) -> Question:
    """Turn one LLM-Adapters record into a Question; raise DataError on anything malformed.

    Labels come from the last line ("Answer format: a/b/..."). Numbered labels
    (answer1, solution2, ending3, option1, ...) have option texts in the instruction
    after "<Label>: " (capitalised); each text runs to the next label marker or to the
    blank line before "Answer format". Unnumbered labels (BoolQ's true/false) are
    themselves the option texts.
    """
    if not isinstance(record, dict):
        raise DataError(f"{file}: record {index}: expected an object, got {type(record).__name__}")
    for field in ("instruction", "answer"):
        if field not in record:
            raise DataError(f"{file}: record {index}: field {field!r}: missing (keys: {', '.join(map(str, record)) or 'none'})")
        if not isinstance(record[field], str) or not record[field].strip():
            raise _fail(file, index, field, record[field], "is not a non-empty string")
    instruction = record["instruction"]

    fmt = _FORMAT_RE.search(instruction)
    if fmt is None:
        raise _fail(file, index, "instruction", instruction, "has no 'Answer format: a/b/...' line")
    labels = [s.strip().lower() for s in fmt.group(1).split("/")]
    if len(labels) < 2 or any(not s for s in labels) or len(set(labels)) != len(labels):
        raise _fail(file, index, "instruction", fmt.group(0).strip(), "does not list two or more distinct labels")
    body = instruction[: fmt.start()].rstrip()

    if all(_NUMBERED_RE.fullmatch(s) for s in labels):
        # Find each "<Label>: " marker in order, each at a word boundary after the previous.
        starts, ends = [], []
        pos = 0
        for s in labels:
            marker = s[0].upper() + s[1:] + ":"
            m = re.compile(r"(?:^|(?<=\s))" + re.escape(marker) + r"(?=\s|$)").search(body, pos)
            if m is None:
                raise _fail(file, index, "instruction", instruction,
                            f"has {len(starts)} options for {len(labels)} labels (no {marker + ' '!r} marker)")
            starts.append(m.start())
            ends.append(m.end())
            pos = m.end()
        texts = [body[ends[i]: starts[i + 1] if i + 1 < len(labels) else len(body)].strip()
                 for i in range(len(labels))]
        for s, text in zip(labels, texts):
            if not text:
                raise _fail(file, index, "instruction", instruction, f"has an empty option text for {s!r}")
        question = body[: starts[0]]
    else:
        texts = labels
        question = body
    question = _strip_prefix(question)
    if not question:
        raise _fail(file, index, "instruction", instruction, "has an empty question text")

    answer = record["answer"].strip().lower()
    if answer not in labels:
        raise _fail(file, index, "answer", record["answer"], f"is not one of {'/'.join(labels)}")
    return Question(task=task, text=question, options=tuple(texts), label=labels.index(answer))


def _read_file(path: Path, task: str) -> list[tuple[Question, str]]:
    """Parse a JSON list file; keep each instruction for the carve hash."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: holds no records")
    return [(parse_record(r, task=task, file=str(path), index=i), r["instruction"])
            for i, r in enumerate(records)]


def load_task(folder: Path, *, carve_fraction: float = 0.5) -> Task:
    """Load one task folder (train.json + test.json, or test.json only).

    With test.json only, a train split is carved out deterministically by content
    (sha256 of the instruction), never by the run seed, so every run and every method
    is evaluated on the same test questions.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: task folder not found")
    if not 0.0 < carve_fraction < 1.0:
        raise DataError(f"carve_fraction: value {carve_fraction!r} must be strictly between 0 and 1")
    name = folder.name
    train_path, test_path = folder / "train.json", folder / "test.json"
    if not test_path.is_file():
        raise DataError(f"{test_path}: not found (a task needs test data; train.json alone is not enough)")
    test = _read_file(test_path, name)
    if train_path.is_file():
        train = [q for q, _ in _read_file(train_path, name)]
        return Task(name, tuple(train), tuple(q for q, _ in test), False, str(folder))

    order = sorted(range(len(test)), key=lambda i: (hashlib.sha256(test[i][1].encode("utf-8")).hexdigest(), i))
    n_train = int(len(test) * carve_fraction)
    if n_train == 0 or n_train == len(test):
        raise DataError(f"{test_path}: {len(test)} records are too few to carve a train split at fraction {carve_fraction}")
    in_train = np.zeros(len(test), dtype=bool)
    in_train[order[:n_train]] = True
    return Task(
        name,
        tuple(q for (q, _), t in zip(test, in_train) if t),
        tuple(q for (q, _), t in zip(test, in_train) if not t),
        True,
        str(folder),
    )


def load_tasks(data_dir: Path | None, names: Sequence[str] | None, *,
               carve_fraction: float = 0.5) -> dict[str, Task]:
    """Load several tasks by folder name; None dir -> packaged data, None names -> all found, sorted."""
    root = packaged_data_dir() if data_dir is None else Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found")
    if names is None:
        names = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and ((p / "train.json").is_file() or (p / "test.json").is_file()))
        if not names:
            raise DataError(f"{root}: no task folders (with train.json or test.json) found")
    if not names:
        raise DataError(f"{root}: no task names given")
    if len(set(names)) != len(names):
        raise DataError(f"data.tasks: value {list(names)!r} names a task twice")
    return {n: load_task(root / n, carve_fraction=carve_fraction) for n in names}


DIRICHLET_DRAWS = ("per_task", "per_client")


def partition(task_of_example: np.ndarray, num_clients: int, *, alpha: float | None, seed: int,
              min_samples: int = 1, draw: str = "per_task") -> list[np.ndarray]:
    """Split example indices over clients: iid (alpha None) or Dirichlet over tasks.

    Two Dirichlet draws are common in FL papers; both give every example to one client:

    * ``per_task`` (FSLoRA's "Dirichlet 0.1 over tasks"): for each task draw its shares over
      the clients ~ Dir(alpha * 1_N) and cut that task's shuffled examples accordingly,
      which makes clients both non-iid and unequal in size. With many clients and few tasks
      most clients get almost nothing (50 clients, 4 tasks, alpha 0.1: no draw in 1,000
      leaves every client 8 examples).
    * ``per_client`` (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
      Distribution"): each client draws its task mixture pi_c ~ Dir(alpha * 1_K); each task's
      shuffled examples are then cut over the clients in proportion to pi_{c,t}. Small alpha:
      each client is mostly one task, and the clients on a task share it, so sizes follow
      how many clients a task has.

    Draws are repeated on the same rng stream until every client holds at least
    ``min_samples`` examples, so one seed fixes the whole result.
    """
    labels = np.asarray(task_of_example).ravel()
    n = labels.size
    if num_clients < 1:
        raise DataError(f"data.num_clients: value {num_clients!r} must be at least 1")
    if min_samples < 0:
        raise DataError(f"min_samples: value {min_samples!r} must be >= 0")
    if draw not in DIRICHLET_DRAWS:
        raise DataError(f"data.dirichlet_draw: value {draw!r} must be one of {', '.join(DIRICHLET_DRAWS)}")
    if num_clients * min_samples > n:
        raise DataError(f"data.num_clients: value {num_clients} clients x {min_samples} samples "
                        f"exceeds the {n} training examples")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if not alpha > 0:
        raise DataError(f"data.dirichlet_alpha: value {alpha!r} must be > 0 (or null for iid)")

    tasks = np.unique(labels)
    for _ in range(1000):
        if draw == "per_client":
            mixture = rng.dirichlet(np.full(tasks.size, float(alpha)), size=num_clients)  # [N, K]
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k, t in enumerate(tasks):
            idx = rng.permutation(np.flatnonzero(labels == t))
            if draw == "per_client":
                p = mixture[:, k] / mixture[:, k].sum()
            else:
                p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
        clients = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(c.size for c in clients) >= min_samples:
            return clients
    raise DataError(f"data.dirichlet_alpha: value {alpha} left some client with fewer than {min_samples} "
                    f"examples in 1000 draws ({num_clients} clients, {tasks.size} tasks, {draw} draw); "
                    "use a larger alpha, fewer clients or data.dirichlet_draw=per_client")


def subsample(n: int, k: int | None, *, seed: int) -> np.ndarray:
    """Sorted indices of a fixed evaluation subset (k of n); k None or >= n -> all of them."""
    if n < 0:
        raise DataError(f"n: value {n!r} must be >= 0")
    if k is None or k >= n:
        return np.arange(n, dtype=np.int64)
    if k < 0:
        raise DataError(f"eval.max_examples: value {k!r} must be >= 0")
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)
