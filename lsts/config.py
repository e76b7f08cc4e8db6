"""The typed configuration of a training run: dataclass sections, a strict YAML loader, CLI overrides.

Precedence is CLI > file > defaults. The dataclass defaults *are* the CPU demo (``configs/demo.yaml``
is a commented copy of them, pinned by a test), so a bare ``python launch/train.py`` runs anywhere.
Overrides look like ``--model.dim=512`` or ``--model.dim 512``; a few shorthands (``--seq-len``,
``--steps``, ``--out``, ``--resume``, ``--seed``) cover the common cases. Unknown sections or fields
in a file or on the command line are errors that suggest the closest valid key: a typo must never
silently train with the default.

Each field's one-line help is its comment, kept as field metadata so that the same text documents
the code, ``--help`` and the saved ``config.yaml``.

Limits: ``"auto"`` values (device, dtype, backends) are carried as they are and resolved by the
trainer, which knows the hardware. Whether the parallel degrees fit the world is checked here when
the caller knows its size (a launcher passes torchrun's ``WORLD_SIZE``), else when the device mesh
is built. Everything here is pure Python: no torch import, so ``--help`` is instant.
"""

# ruff: noqa: RUF009  # `_f` is `dataclasses.field` with help metadata: its result is not a shared default

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import sys
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Self

import yaml

from lsts.kernels.backend import BACKENDS

Backend = Literal[BACKENDS]


def _f(default: Any, help: str) -> Any:
    """A field with a default and its one-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """A decoder-only transformer (SwiGLU, RMSNorm, RoPE, GQA) with MASFormer attention spans."""

    vocab_size: int = _f(256, "vocabulary size (256 = the byte tokenizer); pad up for speed")
    dim: int = _f(64, "model width")
    n_layers: int = _f(4, "number of transformer blocks")
    n_heads: int = _f(4, "query heads")
    n_kv_heads: int = _f(2, "key/value heads (GQA); must divide n_heads")
    ffn_dim: int = _f(0, "SwiGLU hidden width; 0 = 8/3·dim rounded up to multiple_of")
    multiple_of: int = _f(64, "rounding of the derived ffn_dim")
    rope_base: float = _f(10000.0, "RoPE theta")
    rope_scaling: float = _f(1.0, "linear RoPE scaling (position interpolation) factor; 1 = off")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _f(True, "share the input embedding with the output projection")
    full_layers: Literal["all", "bottom", "top", "interleave"] = _f("top", "where the full-attention layers are")
    n_full: int = _f(1, "number of full-attention layers (ignored when full_layers is 'all')")
    span: Literal["window", "block"] = _f("window", "attention of the other layers: sliding window or diagonal blocks")
    span_size: int = _f(256, "window w or block b of the other layers, in tokens")
    init_std: float = _f(0.02, "std of the normal initialisation of weights")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """The SwiGLU hidden width: ``ffn_dim``, or 8/3·dim (same parameters as a 4·dim MLP)."""
        if self.ffn_dim:
            return self.ffn_dim
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)

    def full_layer_ids(self) -> list[int]:
        """Indices of the full-attention layers. "interleave" spaces them evenly and ends on the top
        layer (docs/algorithms.md §5 leaves the placement open: this is one preset among three)."""
        L, n = self.n_layers, self.n_full
        if self.full_layers == "all":
            return list(range(L))
        if self.full_layers == "bottom":
            return list(range(n))
        if self.full_layers == "top":
            return list(range(L - n, L))
        return [(k + 1) * L // n - 1 for k in range(n)]

    def layer_spans(self) -> list[tuple[str, int]]:
        """``(kind, size)`` per layer, as `lsts.kernels.attention.spans.Span` takes them."""
        full = set(self.full_layer_ids())
        return [("causal", 0) if i in full else (self.span, self.span_size) for i in range(self.n_layers)]

    def size_errors(self) -> list[str]:
        """Sizes out of range, each with its fix; `relation_errors` divides by them, so check these first."""
        errors = _at_least("model", self, 1, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of")
        errors += _at_least("model", self, 0, "ffn_dim", "n_full", "span_size")
        return errors + _positive("model", self, "rope_base", "rope_scaling", "norm_eps", "init_std")

    def relation_errors(self) -> list[str]:
        """Fields that do not fit each other (for sizes `size_errors` accepts), each with its fix."""
        errors = []
        if self.n_heads % self.n_kv_heads:
            ok = [k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]
            bad = f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            errors.append(f"{bad}: set n_kv_heads to one of {ok}")
        if self.dim % self.n_heads or self.head_dim % 2:
            errors.append(
                f"model.dim ({self.dim}) must be n_heads ({self.n_heads}) × an even head dim (RoPE rotates pairs)"
            )
        if self.full_layers != "all" and self.n_full > self.n_layers:
            errors.append(f"model.n_full ({self.n_full}) exceeds model.n_layers ({self.n_layers})")
        elif len(self.full_layer_ids()) < self.n_layers and self.span_size < 1:
            errors.append(f"model.span_size must be >= 1 for the {self.span} layers; set e.g. --model.span_size=1024")
        return errors


DEGREES = ("dp_replicate", "dp_shard", "tp", "pp", "cp_ring", "cp_ulysses")

# The sequence layouts, the one list of them (`lsts.parallel.sharding` implements each; here, torch-free,
# for the config's choices). Layouts that depend on the pack's documents need ``cu_seqlens`` wherever named.
LAYOUTS = ("zigzag", "contiguous", "stripe", "balanced")  # the default first
DOCUMENT_LAYOUTS = ("balanced",)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; choose one of {LAYOUTS}")


def seq_len_divisor(layout: str, world: int) -> int:
    """The global sequence length must be a multiple of this for ``layout`` on ``world`` ranks."""
    check_layout(layout)
    return 2 * world if layout == "zigzag" else world


@dataclass
class ParallelConfig:
    """Parallel degrees and engines; a launcher checks that they fit its world size."""

    dp_replicate: int = _f(1, "data-parallel replicas (HSDP outer axis)")
    dp_shard: int = _f(1, "data-parallel shards (FSDP axis); -1 = whatever the other degrees leave")
    tp: int = _f(1, "tensor-parallel degree")
    pp: int = _f(1, "pipeline-parallel stages")
    cp_ring: int = _f(-1, "context parallelism: ring attention degree; -1 = whatever the other degrees leave")
    cp_ulysses: int = _f(1, "context parallelism: Ulysses (all-to-all over heads) degree")
    layout: Literal[(*LAYOUTS, "auto")] = _f(
        "zigzag",
        "how the sequence is cut across cp ranks; balanced: by each pack's documents, equal work under doc masking; "
        "auto: per row, zigzag or (ring only, doc masking) balanced, whichever loads the busiest rank least",
    )
    dp_engine: Literal["fsdp2", "ddp", "zero1", "zero2", "zero3"] = _f("fsdp2", "data-parallel engine")
    activation_checkpoint: Literal["none", "full", "selective"] = _f("none", "recompute activations in backward")
    activation_offload: bool = _f(
        False, "keep each checkpointed block's input in pinned host memory until its backward (needs checkpointing)"
    )
    mlp_tile_tokens: int = _f(0, "feed-forward over tiles of this many tokens, recomputed in backward (0: off)")
    pp_microbatches: int = _f(1, "micro-batches per step in the pipeline schedule")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "process-group backend; auto = nccl on CUDA, else gloo")
    timeout_s: int = _f(600, "collective timeout in seconds")

    @property
    def cp(self) -> int:
        """Context-parallel degree: the sequence is split over ``cp_ring × cp_ulysses`` ranks."""
        return self.cp_ring * self.cp_ulysses

    @property
    def seq_len_divisor(self) -> int:
        """Global sequence lengths must be multiples of this (`seq_len_divisor` of the layout)."""
        return seq_len_divisor("zigzag" if self.layout == "auto" else self.layout, self.cp)  # auto may take zigzag

    def resolved(self, world_size: int) -> ParallelConfig:
        """A copy with the one degree set to -1 (``dp_shard`` or ``cp_ring``) filled in for
        ``world_size`` ranks; ValueError naming the degrees when they do not fit it."""
        fill = [n for n in ("dp_shard", "cp_ring") if getattr(self, n) == -1]
        others = self.dp_replicate * self.tp * self.pp * self.cp_ulysses
        others *= (self.cp_ring if "cp_ring" not in fill else 1) * (self.dp_shard if "dp_shard" not in fill else 1)
        value = world_size // others if fill else 1
        if len(fill) > 1 or value < 1 or others * (value if fill else 1) != world_size:
            degrees = " × ".join(f"parallel.{n}={getattr(self, n)}" for n in DEGREES if getattr(self, n) != 1)
            if others > world_size or world_size % others:
                need = f"a multiple of {others}" if fill else str(others)
                raise ValueError(
                    f"{others} ranks do not fit a world of {world_size}: the degrees {degrees or '(all 1)'} need "
                    f"{need} ranks; launch {need} ranks (torchrun --nproc-per-node) or change the degrees"
                )
            raise ValueError(
                f"the degrees {degrees or '(all 1)'} multiply to {others} ranks, not the world of {world_size}; set "
                "parallel.dp_shard or parallel.cp_ring to -1 to fill it, or launch fewer ranks"
            )
        return replace(self, **{n: value for n in fill})


@dataclass
class KernelsConfig:
    """Implementation per op, as `lsts.kernels.backend.resolve_backend` takes it."""

    attention: Backend = _f("auto", "attention kernels; auto = triton on CUDA, torch on CPU")
    loss: Backend = _f("auto", "chunked linear + cross-entropy")
    norm: Backend = _f("auto", "RMSNorm")
    rope: Backend = _f("auto", "rotary embedding")
    loss_chunk_size: int = _f(4096, "tokens per chunk of the loss: the [chunk, vocab] logits buffer")


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed."""

    dataset: str = _f("stdlib", "'stdlib' (Python's own sources, offline), a HF dataset name, or .txt/.jsonl path")
    text_field: str = _f("text", "field of a record that holds the text (HF and .jsonl)")
    tokenizer: str = _f("byte", "'byte' (UTF-8 bytes, vocab 256) or a transformers tokenizer name or path")
    seq_len: int = _f(4096, "tokens per packed sequence (global, before context-parallel sharding)")
    batch_size: int = _f(1, "sequences per micro-batch per data-parallel rank")
    doc_masking: bool = _f(True, "attention stays inside documents (else only position ids restart)")
    seed: int = _f(0, "seed of the data order")


@dataclass
class OptimConfig:
    """AdamW with warmup then decay."""

    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of the decay")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas; on the CLI as 0.9,0.95")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(2, "linear warmup steps")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = off")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "decay after warmup")


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = _f(10, "optimizer steps")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    seed: int = _f(0, "seed of weights and dropout")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("auto", "auto = bf16 on CUDA, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available")
    out: str = _f("runs/demo", "output directory: checkpoints, metrics, config.yaml")
    resume: Literal["false", "true", "auto"] = _f(
        "false",
        "true (= --resume): continue from the latest complete checkpoint in out, an error if there is none; "
        "auto (= --resume=auto): continue from it if there is one, else start at step 0; false: start at step 0",
    )
    log_every: int = _f(1, "steps between log lines (and metrics.jsonl records)")
    compile: bool = _f(False, "torch.compile each transformer block (whole-graph where attention is local)")


@dataclass
class CheckpointConfig:
    """Atomic checkpoints under out/checkpoints/step-NNNNNN."""

    every: int = _f(5, "steps between checkpoints; 0 = only at the end")
    keep: int = _f(2, "most recent checkpoints kept; 0 = keep all")


@dataclass
class MetricsConfig:
    """What a run reports: log lines, metrics.jsonl, TensorBoard, a progress bar."""

    tensorboard: bool = _f(True, "write TensorBoard events under out/tb")
    jsonl: bool = _f(True, "append one JSON line per logged step to out/metrics.jsonl")
    progress_bar: bool = _f(True, "show a progress bar on rank 0 when stderr is a terminal")
    all_ranks: bool = _f(False, "log from every rank (prefixed with its rank), not only rank 0")


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_BOOLS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (a CLI string or a YAML scalar) as type ``tp``; ValueError naming the key and value."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if {"true", "false"} <= set(choices) and (value in (True, False) or str(value).lower() in _BOOLS):
            value = str(_BOOLS[str(value).lower()]).lower()  # a boolean spelling of a tri-state: "true"/"false"
        if value not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {list(choices)}{_suggest(str(value), choices)}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        args = typing.get_args(tp)
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ValueError(f"{key}: {value!r} is not {len(args)} comma-separated values (e.g. 0.9,0.95)")
        return tuple(_coerce(item.strip() if isinstance(item, str) else item, a, key) for item, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise ValueError(f"{key}: {value!r} is not a boolean; use true/false (or yes/no, 1/0)")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # bool is an int subclass
    if (tp is int and number and isinstance(value, int)) or (tp is str and isinstance(value, str)):
        return value
    if tp is float and number:
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return tp(value)
    kind = {int: "an integer", float: "a number", str: "a string (quote it in YAML)"}[tp]
    raise ValueError(f"{key}: {value!r} is not {kind}")


def _at_least(section: str, obj: Any, minimum: float, *names: str) -> list[str]:
    return [f"{section}.{n} ({getattr(obj, n)}) must be >= {minimum}" for n in names if getattr(obj, n) < minimum]


def _positive(section: str, obj: Any, *names: str) -> list[str]:
    return [f"{section}.{n} ({getattr(obj, n)}) must be > 0" for n in names if not getattr(obj, n) > 0]


class InvalidConfig(ValueError):
    """Every bad value of a configuration at once: ``problems`` holds one line per failing check."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = list(problems)


class Sections:
    """A whole run as dataclass sections: strict setting by ``section.field``, YAML in and out, and
    the checks every job shares. `Config` (training) and the fine-tuning run config derive from it
    with their own sections; each job's ``validate`` adds its own checks to `common_errors`."""

    def set(self, key: str, value: Any, source: str = "<override>") -> None:
        """Set ``section.field`` to ``value`` coerced to the field's type; strict about the key."""
        section, _, name = key.partition(".")
        obj = self._section(section, source)
        hints = typing.get_type_hints(type(obj))  # resolves the string annotations of `from __future__`
        if name not in hints:
            raise ValueError(
                f"{source}: unknown field {key!r}{_suggest(name, hints)}; valid fields of {section}: {list(hints)}"
            )
        setattr(obj, name, _coerce(value, hints[name], key))

    def _section(self, name: str, source: str) -> Any:
        sections = [f.name for f in fields(self)]
        if name not in sections:
            raise ValueError(f"{source}: unknown section {name!r}{_suggest(name, sections)}; valid: {sections}")
        return getattr(self, name)

    def update(self, data: dict[str, Any], source: str = "<dict>") -> Self:
        """Overlay a nested ``{section: {field: value}}`` mapping (a partial one is fine); returns self."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        for section, values in data.items():
            if not isinstance(values, dict):
                self._section(str(section), source)  # an unknown name is the better error
                raise ValueError(f"{source}: section {section!r} must be a mapping of fields, got {values!r}")
            for name, value in values.items():
                self.set(f"{section}.{name}", value, source)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Self:
        """Defaults overlaid with ``data`` (the shape of `to_dict`)."""
        return cls().update(data, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Defaults overlaid with a YAML file of the same nesting."""
        if not Path(path).is_file():
            raise ValueError(f"config file {str(path)!r} not found; the shipped ones are in configs/")
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
        return cls.from_dict(data or {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: {n: list(v) if isinstance(v, tuple) else v for n, v in s.items()} for k, s in asdict(self).items()}

    def to_yaml(self) -> str:
        """The resolved config as YAML, each field with its help as a comment; `from_yaml` reads it back."""
        lines = ["# lsts configuration (resolved: defaults < file < command line)"]
        for f in fields(self):
            section = getattr(self, f.name)
            lines.append(f"{f.name}:")
            for sf in fields(section):
                value = getattr(section, sf.name)
                value = list(value) if isinstance(value, tuple) else value
                text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("...\n").strip()
                lines.append(f"  {sf.name}: {text}  # {sf.metadata['help']}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())

    def world_errors(self, world_size: int | None) -> list[str]:
        """Whether the parallel degrees fit ``world_size`` ranks (nothing to say when it is unknown,
        or when a degree is invalid: `common_errors` names that)."""
        p = self.parallel
        degrees = [getattr(p, n) for n in DEGREES]
        if world_size is None or any(d < 1 and d != -1 for d in degrees) or degrees.count(-1) > 1:
            return []
        try:
            p.resolved(world_size)
        except ValueError as e:
            return [str(e)]
        return []

    def common_errors(self) -> list[str]:
        """Bad values of the sections every job has (parallel, kernels, data, optim, train,
        checkpoint), each with its fix."""
        p, d, o, t = self.parallel, self.data, self.optim, self.train
        errors = _at_least("parallel", p, 1, "dp_replicate", "tp", "pp", "cp_ulysses", "pp_microbatches")
        for name in ("dp_shard", "cp_ring"):
            if getattr(p, name) < 1 and getattr(p, name) != -1:
                errors.append(f"parallel.{name} ({getattr(p, name)}) must be >= 1, or -1 to fill the world")
        if p.dp_shard == p.cp_ring == -1:
            errors.append("parallel.dp_shard and parallel.cp_ring are both -1: only one degree can fill the world")
        if p.activation_offload and p.activation_checkpoint == "none":
            errors.append(
                "parallel.activation_offload offloads the inputs checkpointing keeps: set "
                "--parallel.activation_checkpoint=full (or selective)"
            )
        errors += _at_least("parallel", p, 0, "mlp_tile_tokens")
        errors += _positive("parallel", p, "timeout_s") + _positive("kernels", self.kernels, "loss_chunk_size")
        errors += _at_least("data", d, 1, "seq_len", "batch_size") + _at_least("data", d, 0, "seed")
        errors += _positive("optim", o, "lr", "eps") + _at_least("optim", o, 0, "min_lr", "weight_decay")
        errors += _at_least("optim", o, 0, "warmup_steps", "grad_clip")
        if not all(0 <= b < 1 for b in o.betas):
            errors.append(f"optim.betas ({list(o.betas)}) must each be in [0, 1), e.g. 0.9,0.95")
        errors += _at_least("train", t, 1, "steps", "grad_accum", "log_every") + _at_least("train", t, 0, "seed")
        errors += _at_least("checkpoint", self.checkpoint, 0, "every", "keep")
        if errors:  # the relations would divide by zero on the values rejected above
            return errors
        if p.layout == "stripe" and p.cp_ring > 1 and p.cp_ulysses > 1:
            errors.append(
                "parallel.layout 'stripe' does not compose ring with Ulysses (see lsts.parallel.hybrid); use zigzag"
            )
        if p.layout == "balanced" and ((p.cp_ring > 1 and p.cp_ulysses > 1) or not d.doc_masking):
            errors.append(
                "parallel.layout 'balanced' cuts each pack by its documents: it needs data.doc_masking=true and "
                "does not compose ring with Ulysses (see lsts.parallel.hybrid); use zigzag or auto"
            )
        if p.cp_ring != -1 and d.seq_len % (div := p.seq_len_divisor):  # -1: checked once the world is known
            lo, hi = d.seq_len // div * div, (d.seq_len // div + 1) * div
            errors.append(
                f"data.seq_len ({d.seq_len}) must be a multiple of {div} (layout {p.layout!r} over cp={p.cp} "
                f"ranks); use {lo or hi} or {hi}"
            )
        if o.min_lr > o.lr:
            errors.append(f"optim.min_lr ({o.min_lr}) exceeds optim.lr ({o.lr})")
        return errors

    def validate(self, world_size: int | None = None) -> None:
        """`InvalidConfig` listing every bad value and its fix; with ``world_size`` (known to a
        launcher), the parallel degrees are checked against it too, else at mesh build."""
        errors = self.world_errors(world_size) + self.common_errors()
        if errors:
            raise InvalidConfig(errors)


@dataclass
class Config(Sections):
    """A training run of `lsts.models.MASFormer`. Build with `load_config` (validated) or
    `from_dict` / `from_yaml` (not yet)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self, world_size: int | None = None) -> None:
        """`InvalidConfig` listing every bad value and its fix (see `Sections.validate`)."""
        errors = self.model.size_errors() + self.common_errors()
        if not errors:  # the relations would divide by zero on the values rejected above
            errors = self.model.relation_errors() + self._parallel_relations()
        # First: the root cause when the degrees misfit the model too.
        errors = self.world_errors(world_size) + errors
        if errors:
            raise InvalidConfig(errors)

    def _parallel_relations(self) -> list[str]:
        """Checks between the model's fields and the parallel degrees."""
        m, p = self.model, self.parallel
        errors = []
        if m.n_heads % p.tp or m.n_heads < p.tp * p.cp_ulysses:  # Ulysses splits unevenly, tp evenly
            errors.append(
                f"model.n_heads ({m.n_heads}) must be divisible by parallel.tp and give each of the "
                f"parallel.tp × parallel.cp_ulysses ({p.tp} × {p.cp_ulysses}) ranks a head: both split the heads"
            )
        if p.pp > m.n_layers:
            errors.append(f"parallel.pp ({p.pp}) exceeds model.n_layers ({m.n_layers}): each stage needs a layer")
        return errors


# Shorthand flags for the common overrides; each is an alias of its --section.field option.
SHORTHANDS = {"--seq-len": "data.seq_len", "--steps": "train.steps", "--out": "train.out", "--seed": "train.seed"}

_EPILOG = """\
Any field can be overridden as --section.field=value or --section.field value, e.g.
  --model.dim=512 --parallel.cp_ring 4 --optim.betas=0.9,0.95 --metrics.tensorboard=false
Precedence: command line > --config file > built-in defaults (the CPU demo, = configs/demo.yaml).
Unknown keys are errors. Booleans take true/false, yes/no, 1/0."""


def _keys(cls: type[Sections]) -> list[str]:
    """Every ``section.field`` name."""
    cfg = cls()
    return [f"{f.name}.{sf.name}" for f in fields(cfg) for sf in fields(getattr(cfg, f.name))]


def _metavar(tp: Any) -> str:
    """How ``--help`` shows the values a field takes: its choices, or its kind."""
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(typing.get_args(tp)) + "}"
    if typing.get_origin(tp) is tuple:
        return ",".join(t.__name__.upper() for t in typing.get_args(tp))
    return "{true,false}" if tp is bool else {int: "INT", float: "FLOAT", str: "TEXT"}[tp]


def _shown(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "''"


def build_parser(
    cls: type[Sections] = Config, shorthands: dict[str, str] | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    """The argparse parser of `load_config`: one option per field of ``cls``, grouped by section."""
    shorthands = SHORTHANDS if shorthands is None else shorthands
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--config FILE.yaml] [--section.field=value ...] [shorthands] [--print-config] [--debug]",
        description=description or "lsts: distributed long-sequence training",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a prefix must not silently pick a field
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with the same section/field nesting")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of configuration and input errors")
    absent = {"default": argparse.SUPPRESS}  # absent options stay absent: the file keeps its value
    defaults = cls()
    hints = {f.name: typing.get_type_hints(type(getattr(defaults, f.name))) for f in fields(defaults)}
    short = parser.add_argument_group("shorthands")
    for flag, key in shorthands.items():
        section, name = key.split(".")
        short.add_argument(flag, dest=key, metavar=_metavar(hints[section][name]), help=f"= --{key}", **absent)
    short.add_argument(
        "--resume",
        dest="train.resume",
        nargs="?",
        const="true",
        metavar="auto",
        help="= --train.resume=true: continue from the latest complete checkpoint in train.out (an error if there "
        "is none); --resume=auto starts at step 0 when there is none",
        **absent,
    )
    for f in fields(defaults):
        section = getattr(defaults, f.name)
        group = parser.add_argument_group(f.name, type(section).__doc__)
        for sf in fields(section):
            group.add_argument(
                f"--{f.name}.{sf.name}",
                dest=f"{f.name}.{sf.name}",
                metavar=_metavar(hints[f.name][sf.name]),
                help=f"{sf.metadata['help']} (default: {_shown(getattr(section, sf.name))})",
                **absent,
            )
    return parser


def load_config(
    argv: list[str] | None = None,
    cls: type[Sections] = Config,
    shorthands: dict[str, str] | None = None,
    description: str | None = None,
    world_size: int | None = None,
):
    """Defaults of ``cls`` < ``--config`` file < command-line overrides, validated (against
    ``world_size`` ranks when given: a launcher knows it). ``argv`` defaults to ``sys.argv[1:]``;
    ``shorthands`` (flag -> ``section.field``) to the training ones. ``--print-config`` prints the
    YAML and raises ``SystemExit(0)``; ``--help`` too."""
    shorthands = SHORTHANDS if shorthands is None else shorthands
    parser = build_parser(cls, shorthands, description)
    args, rest = parser.parse_known_args(argv)
    if rest:
        bad = next((a for a in rest if a.startswith("-")), rest[0])
        name = bad.partition("=")[0]
        options = ["--config", "--print-config", "--debug", "--resume", *shorthands, *(f"--{k}" for k in _keys(cls))]
        raise ValueError(f"command line: unknown option {name!r}{_suggest(name, options)}; see --help")
    cfg = cls.from_yaml(args.config) if args.config else cls()
    for key, value in vars(args).items():
        if "." in key:
            cfg.set(key, value, source="command line")
    cfg.validate(world_size)
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        raise SystemExit(0)
    return cfg
