"""Tests for fedlora.data: parsing, loading the shipped tasks, partitioning, subsampling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedlora.data import (
    DataError,
    Question,
    load_task,
    load_tasks,
    packaged_data_dir,
    parse_record,
    partition,
    subsample,
)

PREFIX = "Please choose the correct answer to the question: "


def rec(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def parse(instruction: str, answer: str, task: str = "t") -> Question:
    return parse_record(rec(instruction, answer), task=task, file="f.json", index=0)


# ---------------------------------------------------------------- parsing formats

def test_parse_answer_format_four_options():
    q = parse(PREFIX + "Which factor causes a fever?\n\nAnswer1: a leg muscle Answer2: bacteria in blood "
              "Answer3: viral particles Answer4: carbohydrates\n\nAnswer format: answer1/answer2/answer3/answer4",
              "answer2", task="ARC-Easy")
    assert q == Question("ARC-Easy", "Which factor causes a fever?",
                         ("a leg muscle", "bacteria in blood", "viral particles", "carbohydrates"), 1)


def test_parse_five_answers_with_colons_and_answer_words_inside():
    q = parse(PREFIX + "Ratio question: what is it?\n\nAnswer1: 3:1 ratio Answer2: the answer is answer3 "
              "Answer3: time: 10:30 Answer4: Answer: none Answer5: answer1 or answer2\n\n"
              "Answer format: answer1/answer2/answer3/answer4/answer5", "answer5")
    assert q.text == "Ratio question: what is it?"
    assert q.options == ("3:1 ratio", "the answer is answer3", "time: 10:30", "Answer: none", "answer1 or answer2")
    assert q.label == 4


def test_parse_piqa_solutions():
    q = parse("Please choose the correct solution to the question: When boiling butter, when it's ready, you can"
              "\n\nSolution1: Pour it onto a plate and place it in the freezer.\n\nSolution2: Pour it into a jar"
              "\n\nAnswer format: solution1/solution2", "solution2")
    assert q.text == "When boiling butter, when it's ready, you can"
    assert q.options == ("Pour it onto a plate and place it in the freezer.", "Pour it into a jar")
    assert q.label == 1


def test_parse_hellaswag_endings_keeps_colon_in_question():
    q = parse("Please choose the correct ending to complete the given sentence: Removing ice from car: Then, the "
              "man writes over the snow. then\n\nEnding1: , the man adds wax. Ending2: , a person boards a lift. "
              "Ending3: , he puts on a coat. Ending4: , the man continues removing the snow.\n\n"
              "Answer format: ending1/ending2/ending3/ending4", "ending4")
    assert q.text == "Removing ice from car: Then, the man writes over the snow. then"
    assert q.options == (", the man adds wax.", ", a person boards a lift.", ", he puts on a coat.",
                         ", the man continues removing the snow.")
    assert q.label == 3


def test_parse_winogrande_options():
    q = parse("Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a "
              "better surgeon than Maria so _ got the harder cases.\n\nOption1: Sarah\n\nOption2: Maria\n\n"
              "Answer format: option1/option2", "option1")
    assert q.text == "Sarah was a better surgeon than Maria so _ got the harder cases."
    assert q.options == ("Sarah", "Maria") and q.label == 0


def test_parse_boolq_true_false():
    q = parse("Please answer the following question with true or false, question: do iran and afghanistan "
              "speak the same language?\n\nAnswer format: true/false", "false")
    assert q.text == "do iran and afghanistan speak the same language?"
    assert q.options == ("true", "false") and q.label == 1


def test_unknown_prefix_is_kept():
    q = parse("Context: something happened. Why?\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2",
              "answer1")
    assert q.text == "Context: something happened. Why?"


# ---------------------------------------------------------------- shipped data

@pytest.fixture(scope="module")
def tasks():
    return load_tasks(None, None)


def test_shipped_counts(tasks):
    assert list(tasks) == ["ARC-Challenge", "ARC-Easy", "openbookqa", "social_i_qa"]
    counts = {n: (len(t.train), len(t.test), t.train_carved_from_test) for n, t in tasks.items()}
    assert counts == {
        "ARC-Easy": (2251, 2376, False),
        "ARC-Challenge": (1119, 1172, False),
        "openbookqa": (4957, 500, False),
        "social_i_qa": (977, 977, True),
    }
    for name, t in tasks.items():
        assert t.name == name and Path(t.source) == packaged_data_dir() / name
        for q in t.train + t.test:
            assert q.task == name and q.text and 3 <= len(q.options) <= 5
            assert 0 <= q.label < len(q.options) and all(q.options)
            assert "Answer format" not in q.text and not q.text.startswith("Please choose")


def test_carve_is_stable_and_disjoint(tasks):
    siqa = tasks["social_i_qa"]
    again = load_task(packaged_data_dir() / "social_i_qa")
    assert again.train == siqa.train and again.test == siqa.test
    raw = json.loads((packaged_data_dir() / "social_i_qa" / "test.json").read_text())
    assert len(raw) == 1954
    # The documented rule: order by sha256(instruction), first half -> train, file order kept.
    order = sorted(range(len(raw)), key=lambda i: (hashlib.sha256(raw[i]["instruction"].encode()).hexdigest(), i))
    train_ids = sorted(order[:977])
    test_ids = sorted(order[977:])
    all_q = [parse_record(r, task="social_i_qa", file="x", index=i) for i, r in enumerate(raw)]
    assert list(siqa.train) == [all_q[i] for i in train_ids]
    assert list(siqa.test) == [all_q[i] for i in test_ids]
    # no question (even a duplicated one) sits on both sides
    assert not {raw[i]["instruction"] for i in train_ids} & {raw[i]["instruction"] for i in test_ids}


def test_load_tasks_by_name_and_dir(tmp_path):
    got = load_tasks(packaged_data_dir(), ["openbookqa"])
    assert list(got) == ["openbookqa"]
    with pytest.raises(DataError, match="nope"):
        load_tasks(None, ["nope"])


# ---------------------------------------------------------------- malformed records

GOOD = PREFIX + "Q?\n\nAnswer1: a Answer2: b Answer3: c Answer4: d\n\nAnswer format: answer1/answer2/answer3/answer4"


@pytest.mark.parametrize("record, field, fragment", [
    ({"answer": "answer1"}, "instruction", "missing"),
    ({"instruction": GOOD}, "answer", "missing"),
    (rec(GOOD, "answer7"), "answer", "'answer7' is not one of answer1/answer2/answer3/answer4"),
    (rec(GOOD.replace("\n\nAnswer format: answer1/answer2/answer3/answer4", ""), "answer1"),
     "instruction", "no 'Answer format"),
    (rec(GOOD.replace(" Answer4: d", ""), "answer1"), "instruction", "3 options for 4 labels"),
    (rec(GOOD.replace("Answer2: b", "Answer2: "), "answer1"), "instruction", "empty option text for 'answer2'"),
    (rec(GOOD, ""), "answer", "not a non-empty string"),
])
def test_malformed_record_message(record, field, fragment):
    with pytest.raises(DataError) as exc:
        parse_record(record, task="t", file="data/x.json", index=17)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("data/x.json: record 17: ")
    assert f"field '{field}'" in msg and fragment in msg


def test_malformed_record_in_file_names_file_and_index(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    records = [rec(GOOD, "answer1")] * 3 + [rec(GOOD, "answer7")]
    (folder / "test.json").write_text(json.dumps(records))
    (folder / "train.json").write_text(json.dumps(records[:1]))
    with pytest.raises(DataError, match=r"test\.json: record 3: field 'answer': value 'answer7'"):
        load_task(folder)


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(DataError, match="missing_task"):
        load_task(tmp_path / "missing_task")
    with pytest.raises(DataError, match="missing_dir"):
        load_tasks(tmp_path / "missing_dir", None)
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train.json").write_text(json.dumps([rec(GOOD, "answer1")]))
    with pytest.raises(DataError, match="test data"):
        load_task(only_train)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.json").write_text('[{"instruction": ')
    with pytest.raises(DataError, match=r"bad/test\.json: invalid JSON"):
        load_task(bad)
    (bad / "test.json").write_text('{"instruction": "x"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_task(bad)


def test_carve_only_test_folder(tmp_path):
    folder = tmp_path / "siqa"
    folder.mkdir()
    records = [rec(GOOD.replace("Q?", f"Question {i}?"), "answer2") for i in range(10)]
    (folder / "test.json").write_text(json.dumps(records))
    t = load_task(folder, carve_fraction=0.3)
    assert t.train_carved_from_test and len(t.train) == 3 and len(t.test) == 7
    texts = [q.text for q in t.train + t.test]
    assert sorted(texts) == sorted(f"Question {i}?" for i in range(10))
    # order within each part follows the file
    for part in (t.train, t.test):
        nums = [int(q.text.split()[1][:-1]) for q in part]
        assert nums == sorted(nums)


# ---------------------------------------------------------------- partition / subsample

@pytest.fixture(scope="module")
def task_ids(tasks):
    return np.concatenate([np.full(len(t.train), i) for i, t in enumerate(tasks.values())])


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize("alpha", [None, 0.1, 1.0])
@pytest.mark.parametrize("draw", ["per_task", "per_client"])
def test_partition_disjoint_complete_deterministic(task_ids, alpha, draw):
    parts = partition(task_ids, 10, alpha=alpha, seed=3, draw=draw)
    assert len(parts) == 10
    _check_cover(parts, task_ids.size)
    again = partition(task_ids, 10, alpha=alpha, seed=3, draw=draw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(task_ids, 10, alpha=alpha, seed=4, draw=draw)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_partition_dirichlet_is_skewed_and_unequal(task_ids):
    def mean_max_share(parts):
        return np.mean([np.bincount(task_ids[p], minlength=4).max() / p.size for p in parts])

    global_share = np.bincount(task_ids).max() / task_ids.size
    iid = partition(task_ids, 10, alpha=None, seed=0)
    assert abs(mean_max_share(iid) - global_share) < 0.03
    sizes = [p.size for p in iid]
    assert max(sizes) - min(sizes) <= 1

    skew = [mean_max_share(partition(task_ids, 10, alpha=0.1, seed=s)) for s in range(5)]
    assert np.mean(skew) > 0.8
    sizes = [p.size for p in partition(task_ids, 10, alpha=0.1, seed=0)]
    assert max(sizes) > 3 * min(sizes)


def test_partition_per_client_draw(task_ids):
    """Each client's task mixture ~ Dir(alpha): 50 clients at alpha 0.1 all get data (the
    per-task draw cannot), each mostly one task; a huge alpha gives every client the global
    mix and equal sizes; by symmetry a client gets 1/N of every task on average."""
    def dominant(parts):
        return np.mean([np.bincount(task_ids[p], minlength=4).max() / p.size for p in parts])

    with pytest.raises(DataError, match="per_client"):
        partition(task_ids, 50, alpha=0.1, seed=0, min_samples=8)
    parts = partition(task_ids, 50, alpha=0.1, seed=0, min_samples=8, draw="per_client")
    _check_cover(parts, task_ids.size)
    assert min(p.size for p in parts) >= 8 and dominant(parts) > 0.7

    flat = partition(task_ids, 10, alpha=1e4, seed=0, draw="per_client")
    global_mix = np.bincount(task_ids) / task_ids.size
    for p in flat:
        assert np.allclose(np.bincount(task_ids[p], minlength=4) / p.size, global_mix, atol=0.03)
    sizes = np.array([p.size for p in flat])
    assert sizes.max() <= 1.1 * sizes.min()

    n_tasks = np.bincount(task_ids)
    share0 = np.mean([np.bincount(task_ids[partition(task_ids, 10, alpha=0.5, seed=s, draw="per_client")[0]],
                                  minlength=4) / n_tasks for s in range(400)], axis=0)
    assert np.allclose(share0, 0.1, atol=0.02)  # E[pi_0t / sum_c pi_ct] = 1/N
    with pytest.raises(DataError, match="dirichlet_draw"):
        partition(task_ids, 10, alpha=0.1, seed=0, draw="per_question")


def test_partition_min_samples_and_errors(task_ids):
    parts = partition(task_ids, 20, alpha=0.1, seed=1, min_samples=50)
    assert min(p.size for p in parts) >= 50
    _check_cover(parts, task_ids.size)
    with pytest.raises(DataError, match="exceeds"):
        partition(np.zeros(10, dtype=int), 4, alpha=None, seed=0, min_samples=3)
    with pytest.raises(DataError, match="larger alpha"):
        partition(np.repeat(np.arange(2), 50), 50, alpha=0.01, seed=0, min_samples=2)
    with pytest.raises(DataError):
        partition(task_ids, 0, alpha=None, seed=0)
    with pytest.raises(DataError):
        partition(task_ids, 4, alpha=0.0, seed=0)


def test_subsample():
    assert np.array_equal(subsample(5, None, seed=0), np.arange(5))
    assert np.array_equal(subsample(5, 9, seed=0), np.arange(5))
    a = subsample(100, 10, seed=7)
    assert a.size == 10 and np.array_equal(a, np.sort(a)) and np.unique(a).size == 10
    assert np.array_equal(a, subsample(100, 10, seed=7))
    assert not np.array_equal(a, subsample(100, 10, seed=8))
