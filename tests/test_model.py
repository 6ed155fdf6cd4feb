"""Tests of the model engine (src/fedlora/model.py).

Fast tests use a handful of hand-written questions on the embedded all-MiniLM-L6-v2 (the
cross-encoder scorer: encoder + a LoRA-only score head over the mean-pooled pair) and a tiny random Qwen2 built in
tmp_path; the @slow one trains on real ARC-Easy questions.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedlora.model import EMBEDDED_MODEL, SCORE_HEAD, Engine, ModelError, ModelSpec, resolve_model_path, state_rank

DATA = Path(__file__).resolve().parents[1] / "src" / "fedlora" / "resources" / "commonsense"
ALPHA = 16.0


@dataclass(frozen=True)
class Question:  # the shape of fedlora.data.Question (the engine only reads these fields)
    task: str
    text: str
    options: tuple[str, ...]
    label: int


def load_arc(split: str, task: str = "ARC-Easy") -> list[Question]:
    """Tiny LLM-Adapters parser (independent of fedlora.data)."""
    out = []
    for rec in json.loads((DATA / task / f"{split}.json").read_text()):
        head, rest = rec["instruction"].split("\n\nAnswer1:", 1)
        text = head.split("question:", 1)[1].strip()
        listing = "Answer1:" + rest.split("\n\nAnswer format:")[0]
        options = tuple(o.strip() for o in re.split(r"\s*Answer\d+:\s*", listing) if o.strip())
        out.append(Question(task, text, options, int(rec["answer"][len("answer"):]) - 1))
    return out


QS = [
    Question("color", "What color is a clear daytime sky?", ("blue", "green", "red", "black"), 0),
    Question("color", "What color is fresh grass?", ("purple", "green", "white"), 1),
    Question("science", "Which gas do plants take in for photosynthesis?",
             ("oxygen", "helium", "carbon dioxide", "neon", "argon"), 2),
    Question("science", "What force pulls objects toward the Earth?", ("magnetism", "gravity"), 1),
    Question("science", "Water freezes at what temperature in Celsius?", ("0 degrees", "50 degrees", "100 degrees", "-40 degrees"), 0),
    Question("color", "What color is snow?", ("white", "orange", "blue"), 0),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ModelSpec(EMBEDDED_MODEL, max_length=32), rank=4, seed=0)


def random_state(engine: Engine, seed: int, rank: int | None = None) -> dict:
    """A state with non-zero B, so every rank influences the output."""
    g = torch.Generator().manual_seed(seed)
    r = rank or engine.rank
    return {n: (torch.randn(r, i, generator=g) * 0.05, torch.randn(o, r, generator=g) * 0.05)
            for n, (i, o) in engine.module_shapes.items()}


def take(state: dict, idx: list[int]) -> dict:
    return {n: (a[idx].clone(), b[:, idx].clone()) for n, (a, b) in state.items()}


def scatter(state: dict, sub: dict, idx: list[int]) -> dict:
    out = {n: (a.clone(), b.clone()) for n, (a, b) in state.items()}
    for n, (a, b) in sub.items():
        out[n][0][idx] = a
        out[n][1][:, idx] = b
    return out


# ---------------------------------------------------------------------------- basics
def test_resolve_model_path(tmp_path):
    p = resolve_model_path(EMBEDDED_MODEL)
    assert (p / "config.json").is_file()
    assert resolve_model_path("minilm") == p
    with pytest.raises(ModelError, match="not a local folder") as e:
        resolve_model_path(str(tmp_path / "nope"))
    assert "\n" not in str(e.value) and "nope" in str(e.value)
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError):
        ModelSpec("x", kind="bogus")


def test_module_names_shapes_and_init(engine):
    names = list(engine.module_shapes)
    assert names == sorted(names) and len(names) == 13  # 6 layers x (query, value) + the score head
    assert engine.frozen_prefix == 0  # LoRA in every block: nothing to cache
    assert names[0] == "bert.encoder.layer.0.attention.self.query"
    assert engine.module_shapes[SCORE_HEAD] == (384, 1)
    assert all(s == (384, 384) for n, s in engine.module_shapes.items() if n != SCORE_HEAD)
    s1, s2, s3 = engine.init_state(1), engine.init_state(1), engine.init_state(2)
    for n in names:
        assert torch.equal(s1[n][0], s2[n][0]) and not torch.equal(s1[n][0], s3[n][0])
        a, b = s1[n]
        assert a.shape == (4, 384) and b.shape == (engine.module_shapes[n][1], 4) and a.dtype == torch.float32
        assert not b.any()
        assert a.abs().max() <= 1 / math.sqrt(384) + 1e-6  # kaiming-uniform(a=sqrt 5) bound
    # B = 0 and a zero head: every option scores 0 (chance), with or without the adapter
    s = engine.scores(s1, scaling=4.0, questions=QS)
    assert torch.equal(s, engine.scores(None, scaling=1.0, questions=QS))
    assert not s[torch.isfinite(s)].any()


def test_scores_shape_and_evaluate_per_task(engine):
    s = engine.scores(engine.init_state(0), scaling=4.0, questions=QS)
    assert s.shape == (6, 5)
    assert torch.isinf(s[0, 4]) and torch.isinf(s[3, 2:]).all() and torch.isfinite(s[2]).all()
    acc = engine.evaluate(engine.init_state(0), scaling=4.0, questions=QS, batch_size=4)
    assert set(acc) == {"color", "science"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert set(engine.evaluate(None, scaling=1.0, questions=QS[:2])) == {"color"}
    with pytest.raises(ModelError):
        engine.scores(engine.init_state(0), scaling=1.0, questions=[Question("x", "q", ("a", "b"), 2)])


# ---------------------------------------------------------------------------- sketch
def test_sketch_training_moves_only_the_slice(engine):
    r, idx = engine.rank, [1, 3]
    k = len(idx)
    full = random_state(engine, 0)
    sub = take(full, idx)
    before = {n: (a.clone(), b.clone()) for n, (a, b) in sub.items()}
    res = engine.train_local(sub, scaling=ALPHA / r * r / k, batches=[QS[:3], QS[3:]], lr=0.5)
    assert res.finite and res.num_steps == 2 and len(res.losses) == 2 and res.compute_s > 0
    # the input is untouched, the returned sub-adapter changed
    assert all(torch.equal(sub[n][0], before[n][0]) and torch.equal(sub[n][1], before[n][1]) for n in sub)
    assert any(not torch.equal(res.state[n][0], sub[n][0]) for n in sub)
    assert any(not torch.equal(res.state[n][1], sub[n][1]) for n in sub)
    assert state_rank(res.state) == k
    # scattered back: ranks outside the sketch are bit-identical
    new = scatter(full, res.state, idx)
    out = [j for j in range(r) if j not in idx]
    for n in full:
        assert torch.equal(new[n][0][out], full[n][0][out])
        assert torch.equal(new[n][1][:, out], full[n][1][:, out])
        assert new[n][0].dtype == torch.float32 and new[n][0].device.type == "cpu"


def test_sub_adapter_really_has_rank_k(engine):
    seen = {}

    def probe(live):  # a regularizer that records what is being trained
        seen["A"] = {tuple(a.shape) for a, _ in live.values()}
        seen["B"] = {tuple(b.shape) for _, b in live.values()}
        seen["trainable"] = sum(p.numel() for p in engine.peft.parameters() if p.requires_grad)
        seen["module"] = tuple(engine.layers[next(iter(engine.layers))].lora_A[engine._active].weight.shape)
        return torch.zeros(())

    counts = {}
    for k in (1, engine.rank):
        start = take(engine.init_state(0), list(range(k)))
        engine.train_local(start, scaling=ALPHA / k, batches=[QS[:2]], lr=0.1, regularizer=probe)
        assert seen["A"] == {(k, 384)} and seen["B"] == {(384, k), (1, k)} and seen["module"] == (k, 384)
        counts[k] = seen["trainable"]
    assert counts[1] == sum(i + o for i, o in engine.module_shapes.values()) == 12 * (384 + 384) + 385
    assert counts[engine.rank] == engine.rank * counts[1]


def test_sketch_algebra_matches_masked_full_rank(engine):
    r, idx = engine.rank, [0, 2]
    k = len(idx)
    full = random_state(engine, 1)
    masked = {}
    for n, (a, b) in full.items():
        b2 = torch.zeros_like(b)
        b2[:, idx] = b[:, idx] * (r / k)
        masked[n] = (a, b2)
    s_sub = engine.scores(take(full, idx), scaling=ALPHA / r * r / k, questions=QS)
    s_mask = engine.scores(masked, scaling=ALPHA / r, questions=QS)
    s_base = engine.scores(None, scaling=1.0, questions=QS)
    fin = torch.isfinite(s_sub)
    assert torch.equal(fin, torch.isfinite(s_mask))
    assert (s_sub[fin] - s_mask[fin]).abs().max() < 1e-5
    assert (s_sub[fin] - s_base[fin]).abs().max() > 1e-3  # the adapter matters


def test_deterministic_and_bounded_adapter_cache(engine):
    start = take(random_state(engine, 2), [0, 1, 2])
    kw = dict(scaling=ALPHA / 3, batches=[QS[:3], QS[3:]], lr=1e-2, optimizer="adamw", weight_decay=0.01, max_grad_norm=1.0)
    r1, r2 = engine.train_local(start, **kw), engine.train_local(start, **kw)
    assert r1.losses == r2.losses
    assert all(torch.equal(r1.state[n][0], r2.state[n][0]) and torch.equal(r1.state[n][1], r2.state[n][1]) for n in start)
    for k in range(1, 13):  # many distinct ranks (more than any r) -> cache stays bounded
        engine.train_local(take(random_state(engine, 3, rank=12), list(range(k))), scaling=1.0, batches=[], lr=0.1)
    assert len(engine._adapters) <= engine.max_cached_adapters
    r3 = engine.train_local(start, **kw)  # rank-3 adapter was evicted and rebuilt: same result
    assert r3.losses == r1.losses


def test_nonfinite_stops_early(engine):
    start = random_state(engine, 4)
    res = engine.train_local(start, scaling=4.0, batches=[QS] * 5, lr=1e30)
    assert not res.finite and res.num_steps < 5
    with pytest.raises(ModelError):
        engine.train_local(start, scaling=4.0, batches=[QS], lr=0.1, optimizer="lbfgs")


def test_frozen_prefix_cache_matches_full_forward():
    """LoRA in the top block only: the cached bottom blocks give the scores, the trained
    state and a FLoRA-style merge of the full forward pass (same math, only cached)."""
    eng = Engine(ModelSpec(EMBEDDED_MODEL, max_length=32, lora_layers=(4, 5)), rank=4, seed=0)
    assert eng.frozen_prefix == 4
    assert sorted(eng.layers) == sorted([f"bert.encoder.layer.{i}.attention.self.{m}"
                                         for i in (4, 5) for m in ("query", "value")] + [SCORE_HEAD])
    st = random_state(eng, 3)
    batches = [QS[:3], QS[3:6], QS[:2] + QS[4:]]

    def run():
        scores = eng.scores(st, scaling=2.0, questions=QS, batch_size=3)
        res = eng.train_local(st, scaling=2.0, batches=batches, lr=1e-2, optimizer="adamw")
        name = list(eng.layers)[0]
        eng.merge_into_base({name: torch.randn(384, 384, generator=torch.Generator().manual_seed(1)) * 0.02})
        merged = eng.scores(st, scaling=2.0, questions=QS)
        eng.load_base_delta({})
        return scores, res, merged

    cached = run()
    assert len(eng.scorer.prefix_cache) == sum(len(q.options) for q in QS)
    eng.frozen_prefix = 0  # the full forward pass through all six blocks
    full = run()
    fin = torch.isfinite(full[0])
    assert torch.equal(fin, torch.isfinite(cached[0]))
    assert (cached[0][fin] - full[0][fin]).abs().max() < 1e-5
    assert (cached[2][fin] - full[2][fin]).abs().max() < 1e-5
    assert (cached[2][fin] - cached[0][fin]).abs().max() > 1e-3  # the merge did change the scores
    assert cached[1].losses == pytest.approx(full[1].losses, abs=1e-5)
    # AdamW divides by sqrt(v): last-bit differences of the cached pass reach ~4e-5 in a few of the
    # 1,536 entries after three steps of lr 1e-2, 1 % of a step (measured)
    for n, (a, b) in full[1].state.items():
        assert torch.allclose(cached[1].state[n][0], a, atol=1e-4) and torch.allclose(cached[1].state[n][1], b, atol=1e-4)
    with pytest.raises(ModelError, match=r"lora.layers \[9\]"):
        Engine(ModelSpec(EMBEDDED_MODEL, max_length=32, lora_layers=(5, 9)), rank=4, seed=0)


def test_engines_of_one_model_share_their_caches():
    """Another seed's engine (a study worker's next setting) shares the token and frozen-block
    caches of the last one and scores exactly as a fresh engine; another tokenization or other
    frozen weights do not share."""
    spec = ModelSpec(EMBEDDED_MODEL, max_length=32, lora_layers=(5,))
    a, b, c = (Engine(spec, rank=4, seed=s) for s in (0, 1, 1))
    assert a.frozen_prefix == 5
    a.scores(random_state(a, 3), scaling=2.0, questions=QS)
    filled = len(a.scorer.prefix_cache)
    assert filled == sum(len(q.options) for q in QS)
    assert b.scorer.adopt_caches(a.scorer.caches()) and b.scorer.prefix_cache is a.scorer.prefix_cache
    st = random_state(b, 4)
    shared = b.scores(st, scaling=2.0, questions=QS)
    assert len(a.scorer.prefix_cache) == filled  # nothing computed again
    fresh = c.scores(st, scaling=2.0, questions=QS)
    assert torch.equal(shared, fresh)
    assert not Engine(ModelSpec(EMBEDDED_MODEL, max_length=24, lora_layers=(5,)), rank=4, seed=0).scorer.adopt_caches(
        a.scorer.caches())
    with torch.no_grad():
        c.net.base_model.embeddings.word_embeddings.weight[0, 0] += 1.0
    assert not c.scorer.adopt_caches(a.scorer.caches()) and c.scorer.prefix_cache is not a.scorer.prefix_cache


def test_flops_per_step(engine):
    f8, f16 = engine.flops_per_step(8, QS), engine.flops_per_step(16, QS)
    assert f8 > 0 and f16 == pytest.approx(2 * f8)
    # 6 * ~10.8M matmul params * tokens: a MiniLM step of 8 short questions is ~1e10 FLOPs
    assert 1e9 < f8 < 1e12


# ---------------------------------------------------------------------------- base merges, export
def test_merge_into_base_and_restore(engine):
    names = list(engine.module_shapes)[:3] + [SCORE_HEAD]  # the head's base weight is 0: merge into it too
    g = torch.Generator().manual_seed(5)
    sub = {n: (torch.randn(2, 384, generator=g) * 0.05, torch.randn(engine.module_shapes[n][1], 2, generator=g) * 0.05)
           for n in names}
    zero = {n: (torch.zeros(2, i), torch.zeros(o, 2)) for n, (i, o) in engine.module_shapes.items()}
    as_adapter = {**zero, **sub}
    scale = 3.0
    base = engine.scores(None, scaling=1.0, questions=QS)
    via_adapter = engine.scores(as_adapter, scaling=scale, questions=QS)
    w_before = engine.layers[names[0]].get_base_layer().weight.detach().clone()
    delta = {n: scale * b @ a for n, (a, b) in sub.items()}
    engine.merge_into_base(delta)
    try:
        assert torch.allclose(engine.layers[names[0]].get_base_layer().weight, w_before + delta[names[0]])
        merged = engine.scores(None, scaling=1.0, questions=QS)
        fin = torch.isfinite(base)
        assert (merged[fin] - via_adapter[fin]).abs().max() < 1e-4
        assert (merged[fin] - base[fin]).abs().max() > 1e-3
        saved = engine.base_delta()
        assert set(saved) == set(names)
        engine.load_base_delta({})
        assert torch.equal(engine.scores(None, scaling=1.0, questions=QS), base)
        assert torch.equal(engine.layers[names[0]].get_base_layer().weight, w_before)
        engine.load_base_delta(saved)
        assert torch.equal(engine.scores(None, scaling=1.0, questions=QS), merged)
        with pytest.raises(ModelError):
            engine.merge_into_base({"no.such.module": torch.zeros(3, 3)})
    finally:
        engine.load_base_delta({})


def _standard_scores(adapter: Path, base: Path, questions, max_length=32):
    """The scores a user gets from the saved adapter with standard classes and no fedlora code:
    transformers' AutoModelForTokenClassification + PEFT, the pair's score the mean of its
    token logits (README, "Use the adapter"). Returns scores and the warnings loading raised."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(base, num_labels=1),
                                          adapter).eval()
    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    with torch.no_grad():
        for q in questions:
            enc = tok([q.text] * len(q.options), list(q.options), padding=True, truncation="longest_first",
                      max_length=max_length, return_tensors="pt")
            logits = model(**enc).logits[..., 0]
            mask = enc["attention_mask"]
            rows.append((logits * mask).sum(1) / mask.sum(1))
    width = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (0, width - len(r)), value=-math.inf) for r in rows]), caught


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_save_peft_adapter_loads_on_standard_classes(engine, tmp_path):
    state = random_state(engine, 6)
    ours = engine.scores(state, scaling=ALPHA / engine.rank, questions=QS)
    engine.save_peft_adapter(state, ALPHA, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == engine.rank and cfg["lora_alpha"] == ALPHA
    assert set(cfg["target_modules"]) == {"query", "value"} and cfg["modules_to_save"] == [SCORE_HEAD]
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # portable: a hub id
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    theirs, caught = _standard_scores(tmp_path / "adapter", engine.path, QS)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    fin = torch.isfinite(ours)
    assert torch.equal(fin, torch.isfinite(theirs))
    assert (ours[fin] - theirs[fin]).abs().max() < 1e-4
    assert (ours[fin]).abs().max() > 1e-2  # the head's LoRA did change the scores from 0

    # merged base deltas (FLoRA-style), the head's included, are folded into the exported adapter
    g = torch.Generator().manual_seed(7)
    name = next(iter(engine.module_shapes))
    delta = {name: torch.randn(384, 3, generator=g) @ torch.randn(3, 384, generator=g) * 0.01,
             SCORE_HEAD: torch.randn(1, 384, generator=g) * 0.1}
    engine.merge_into_base(delta)
    try:
        ours = engine.scores(state, scaling=ALPHA / engine.rank, questions=QS)
        engine.save_peft_adapter(state, ALPHA, tmp_path / "adapter2")
    finally:
        engine.load_base_delta({})
    theirs, _ = _standard_scores(tmp_path / "adapter2", engine.path, QS)
    assert (ours[fin] - theirs[fin]).abs().max() < 1e-4


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_readme_adapter_example_gives_the_engines_scores(engine, tmp_path, capsys):
    """The README's "use the adapter" example, run as written (base id and adapter folder
    pointed at this machine's copies: no hub here), scores as the engine does."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md")
                                       .read_text(), flags=re.S) if "AutoModelForTokenClassification" in b)
    base_id = re.search(r'base = "([^"]+)"', block).group(1)
    adapter = re.search(r'PeftModel.from_pretrained\(model, "([^"]+)"\)', block).group(1)
    state = random_state(engine, 11)
    engine.save_peft_adapter(state, ALPHA, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == base_id
    namespace: dict = {}
    exec(compile(block.replace(base_id, str(engine.path)).replace(adapter, str(tmp_path / "adapter")),
                 "README.md", "exec"), namespace)
    q = Question("science", namespace["question"], tuple(namespace["options"]), 0)
    ours = engine.scores(state, scaling=ALPHA / engine.rank, questions=[q])[0]
    assert torch.allclose(namespace["scores"], ours, atol=1e-4)
    assert capsys.readouterr().out.strip() == q.options[int(ours.argmax())]


def test_weights_the_checkpoint_lacks_travel_with_the_adapter(tmp_path):
    """Weights the checkpoint lacks are initialized by the engine (seeded): they are saved whole
    with the adapter, so the standard classes give the engine's scores; a LoRA target among
    them is refused."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny_bert"
    minilm = resolve_model_path(EMBEDDED_MODEL)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / f, folder / f)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("encoder.layer.0.output.dense.")},
              folder / "model.safetensors", metadata={"format": "pt"})
    eng = Engine(ModelSpec(str(folder), max_length=32), rank=2, seed=3)
    assert eng.initialized_modules == ["bert.encoder.layer.0.output.dense"]
    state = random_state(eng, 1)
    ours = eng.scores(state, scaling=ALPHA / 2, questions=QS)
    eng.save_peft_adapter(state, ALPHA, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["bert.encoder.layer.0.output.dense", SCORE_HEAD]
    assert cfg["base_model_name_or_path"] == str(folder)  # no hub id: the folder
    theirs, _ = _standard_scores(tmp_path / "a", folder, QS)
    fin = torch.isfinite(ours)
    assert (ours[fin] - theirs[fin]).abs().max() < 1e-4

    save_file({k: v for k, v in weights.items() if not k.startswith("encoder.layer.1.attention.self.query.")},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"no pretrained weights for LoRA target.*layer.1.attention.self.query"):
        Engine(ModelSpec(str(folder), max_length=32), rank=2, seed=3)


# ---------------------------------------------------------------------------- causal LM path
def make_tiny_causal(path: Path) -> Path:
    """A random 2-layer Qwen2 with a byte-level BPE tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    sentences = [q.text + " " + " ".join(q.options) for q in QS] + [
        "Question: Answer: the correct answer is answer1 answer2 answer3 answer4 answer5",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction: Please choose the correct answer to the question: Answer format: ### Response:",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    config = Qwen2Config(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         initializer_range=0.2, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory) -> Path:
    return make_tiny_causal(tmp_path_factory.mktemp("tiny_qwen2"))


def test_hub_id_from_the_local_cache_and_offline_error(tiny_causal, tmp_path, monkeypatch):
    """`model.name_or_path` may be a hub id: resolved from the Hugging Face cache as transformers
    does (here offline, from a cache laid out as huggingface_hub writes it); not cached and
    offline, one line that says how to give a local folder."""
    import shutil

    from huggingface_hub import constants

    from fedlora.model import resolve_model_path

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fedlora-test--tiny-qwen2"
    shutil.copytree(tiny_causal, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("fedlora-test/tiny-qwen2") == repo / "snapshots" / commit
    eng = Engine(ModelSpec("fedlora-test/tiny-qwen2", max_length=64), rank=2, seed=0)
    assert eng.kind == "causal" and eng.path == repo / "snapshots" / commit
    with pytest.raises(ModelError, match=r"hub model 'fedlora-test/absent'.*model.name_or_path=DIR"):
        resolve_model_path("fedlora-test/absent")


@pytest.mark.parametrize("score", ["option", "answer"])
def test_causal_engine_trains_and_evaluates(tiny_causal, score):
    eng = Engine(ModelSpec(str(tiny_causal), score=score, max_length=128), rank=4, seed=0)
    assert eng.kind == "causal"
    assert set(n.rsplit(".", 1)[1] for n in eng.module_shapes) == {"q_proj", "v_proj"}
    assert eng.module_shapes["model.layers.0.self_attn.v_proj"] == (32, 16)  # 2 kv heads of 8
    start = eng.init_state(0)
    s0 = eng.scores(start, scaling=ALPHA / 4, questions=QS)
    assert s0.shape == (6, 5) and torch.isfinite(s0[2]).all() and torch.isinf(s0[0, 4])
    assert (s0[torch.isfinite(s0)] < 0).all()  # mean log-likelihoods
    res = eng.train_local(start, scaling=ALPHA / 4, batches=[QS[:3], QS[3:]] * 10, lr=1e-2, optimizer="adamw")
    assert res.finite and res.num_steps == 20
    assert sum(res.losses[-2:]) < sum(res.losses[:2])
    before = eng.evaluate(start, scaling=ALPHA / 4, questions=QS)
    after = eng.evaluate(res.state, scaling=ALPHA / 4, questions=QS)
    assert set(after) == {"color", "science"}
    assert sum(after.values()) >= sum(before.values())
    # a sketch slice trains a real rank-2 adapter on the causal path too
    sub = eng.train_local(take(res.state, [0, 3]), scaling=ALPHA / 2, batches=[QS[:3]], lr=1e-2)
    assert state_rank(sub.state) == 2 and sub.finite
    assert eng.flops_per_step(4, QS) > 0


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_causal_save_peft_adapter_roundtrip(tiny_causal, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    eng = Engine(ModelSpec(str(tiny_causal), max_length=128), rank=4, seed=0)
    state = random_state(eng, 8)
    q = QS[0]
    eng.save_peft_adapter(state, ALPHA, tmp_path / "a")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal), tmp_path / "a").eval()
    prompt = eng.tokenizer(f"Question: {q.text}\nAnswer:")["input_ids"]
    expected = []
    with torch.no_grad():
        for opt in q.options:
            cont = eng.tokenizer(f" {opt}", add_special_tokens=False)["input_ids"]
            lp = model(input_ids=torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
            expected.append(sum(lp[len(prompt) + t - 1, c].item() for t, c in enumerate(cont)) / len(cont))
    ours = eng.scores(state, scaling=ALPHA / 4, questions=[q])[0, :len(q.options)]
    assert torch.allclose(ours, torch.tensor(expected), atol=1e-4)


# ---------------------------------------------------------------------------- real training
# Measured (ARC-Easy, 300 test questions, rank 8 on query/value of every block + head, alpha
# 16, batch 8, AdamW lr 1e-3): 0.25 at init (all scores 0) -> 0.44-0.45 after 40-50 steps ->
# 0.46-0.47 after 60-100 steps, on two seeds; lr 2e-3 noisier, 3e-3 unstable. The test runs
# the studies' model instead (LoRA in the top block over the frozen blocks' cache, lr 3e-3,
# about half the time): 0.24 -> 0.46 after 40 steps (0.465 after 80), 200 test questions.
STEPS, LR, MARGIN, N_TEST = 40, 3e-3, 0.10, 200


@pytest.mark.slow
def test_short_training_run_improves_arc_easy_accuracy():
    """40 AdamW steps of batch 8 on ARC-Easy train raise held-out accuracy far above the start
    (LoRA in the top block, the studies' model)."""
    train, test = load_arc("train"), load_arc("test")
    test = random.Random(0).sample(test, N_TEST)
    eng = Engine(ModelSpec(EMBEDDED_MODEL, max_length=64, lora_layers=(5,)), rank=8, seed=0)
    start = eng.init_state(0)
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    batches = [[train[i] for i in order[s * 8:(s + 1) * 8]] for s in range(STEPS)]
    acc0 = eng.evaluate(start, scaling=ALPHA / 8, questions=test)["ARC-Easy"]
    res = eng.train_local(start, scaling=ALPHA / 8, batches=batches, lr=LR, optimizer="adamw")
    acc1 = eng.evaluate(res.state, scaling=ALPHA / 8, questions=test)["ARC-Easy"]
    assert res.finite and res.num_steps == STEPS
    assert sum(res.losses[-10:]) < sum(res.losses[:10])
    assert acc1 >= 0.25 + MARGIN, (acc0, acc1)  # well above chance (4 options)
    assert acc1 >= acc0 + MARGIN, (acc0, acc1)
    print(f"ARC-Easy ({N_TEST} test questions): {acc0:.3f} -> {acc1:.3f} after {STEPS} steps, "
          f"train {res.compute_s:.1f} s")
