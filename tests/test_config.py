"""The config system: precedence, strictness, coercion, round trips, shipped YAML files, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lsts.config import Config, ModelConfig, ParallelConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict | str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_defaults_are_the_demo():
    demo = next(p for p in CONFIGS if p.name == "demo.yaml")
    assert Config.from_yaml(demo) == Config() == load_config([])
    # The file spells out every field, so it documents the defaults rather than leaning on them.
    assert Config.from_yaml(demo).to_dict() == yaml.safe_load(demo.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(["--config", str(path)])
    assert cfg == Config.from_yaml(path)
    assert len(CONFIGS) >= 3


def test_shipped_layouts():
    llama = Config.from_yaml(next(p for p in CONFIGS if p.name.startswith("llama3")))
    m = llama.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert llama.data.seq_len == 131072 and llama.parallel.cp == 8
    assert llama.parallel.resolved(8).dp_shard == 1
    mas = Config.from_yaml(next(p for p in CONFIGS if p.name.startswith("masformer")))
    assert mas.model.full_layer_ids() == [5, 11, 17, 23] and mas.data.seq_len == 8192


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = write(tmp_path, {"model": {"dim": 128, "n_layers": 6}, "train": {"steps": 7}})
    cfg = load_config(["--config", path, "--model.dim=256"])
    assert cfg.model.dim == 256  # CLI beats file
    assert cfg.model.n_layers == 6 and cfg.train.steps == 7  # file beats defaults
    assert cfg.model.n_heads == ModelConfig().n_heads  # untouched: default
    # Order on the command line does not matter: the file is always below the overrides.
    assert load_config(["--model.dim", "256", "--config", path]) == cfg


def test_override_forms_and_shorthands():
    cfg = load_config(["--seq-len", "131072", "--steps=3", "--out", "/tmp/x", "--resume", "--seed", "5"])
    assert (cfg.data.seq_len, cfg.train.steps, cfg.train.out, cfg.train.seed) == (131072, 3, "/tmp/x", 5)
    assert cfg.train.resume == "true"
    assert load_config([]).train.resume == "false"
    assert load_config(["--resume=auto"]).train.resume == "auto"
    # A shorthand and its long form are one option: the last one given wins.
    assert load_config(["--seq-len=1024", "--data.seq_len=2048"]).data.seq_len == 2048
    assert load_config(["--parallel.dp_shard", "-1", "--parallel.dp_shard=2"]).parallel.dp_shard == 2
    assert load_config(["--parallel.dp_shard", "-1", "--parallel.cp_ring=1"]).parallel.dp_shard == -1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("Yes", True), ("1", True), ("false", False), ("no", False), ("0", False), ("OFF", False)],
)
def test_bool_parsing(text, expected):
    assert load_config([f"--metrics.tensorboard={text}"]).metrics.tensorboard is expected
    assert load_config(["--model.tie_embeddings", text]).model.tie_embeddings is expected


def test_types_are_coerced():
    cfg = load_config(["--optim.betas=0.8, 0.99", "--optim.lr=3e-4", "--model.rope_base=500000", "--data.dataset=x"])
    assert cfg.optim.betas == (0.8, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.model.rope_base, float)
    assert cfg.data.dataset == "x"


def test_yaml_values_are_coerced(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string and an int where a float is wanted: both are fine.
    path = write(tmp_path, "optim:\n  lr: 3e-4\n  betas: [0.9, 0.999]\nmodel:\n  rope_base: 500000\n")
    cfg = Config.from_yaml(path)
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.999) and cfg.model.rope_base == 500000.0
    assert isinstance(cfg.model.rope_base, float)


@pytest.mark.parametrize(
    ("arg", "names"),
    [
        ("--model.dim=abc", ["model.dim", "'abc'", "integer"]),
        ("--model.dim=64.5", ["model.dim", "'64.5'"]),
        ("--optim.lr=fast", ["optim.lr", "'fast'", "number"]),
        ("--metrics.jsonl=maybe", ["metrics.jsonl", "'maybe'", "true/false"]),
        ("--optim.betas=0.9", ["optim.betas", "'0.9'", "2 comma-separated"]),
        ("--optim.betas=0.9,x", ["optim.betas", "'x'"]),
        ("--parallel.layout=zigzg", ["parallel.layout", "'zigzg'", "did you mean 'zigzag'"]),
        ("--kernels.attention=cuda", ["kernels.attention", "'cuda'", "triton"]),
    ],
)
def test_bad_cli_values_name_field_and_value(arg, names):
    with pytest.raises(ValueError) as info:
        load_config([arg])
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"model": {"dim": True}}, ["model.dim", "True"]),  # bool is not an int
        ({"model": {"dim": 64.0}}, ["model.dim", "64.0"]),
        ({"data": {"tokenizer": 5}}, ["data.tokenizer", "string"]),
        ({"optim": {"betas": [0.9, 0.95, 0.99]}}, ["optim.betas"]),
        ({"train": {"resume": "perhaps"}}, ["train.resume", "perhaps"]),
    ],
)
def test_bad_file_values_name_field_and_value(tmp_path, data, names):
    with pytest.raises(ValueError) as info:
        Config.from_yaml(write(tmp_path, data))
    for name in names:
        assert name in str(info.value)


def test_unknown_keys_in_file(tmp_path):
    path = write(tmp_path, {"model": {"n_layer": 2}})
    with pytest.raises(ValueError) as info:
        load_config(["--config", path])
    message = str(info.value)
    assert "model.n_layer" in message and "did you mean 'n_layers'" in message and path in message
    assert "n_kv_heads" in message  # the valid fields are listed

    with pytest.raises(ValueError, match=r"unknown section 'optimizer'.*did you mean 'optim'"):
        Config.from_yaml(write(tmp_path, {"optimizer": {"lr": 1.0}}))
    with pytest.raises(ValueError, match=r"section 'model' must be a mapping"):
        Config.from_yaml(write(tmp_path, {"model": 3}))
    with pytest.raises(ValueError, match="mapping of sections"):
        Config.from_yaml(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="not found"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="not valid YAML"):
        Config.from_yaml(write(tmp_path, "model: {dim: [\n"))


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--model.dimm=5"], ["--model.dimm", "did you mean '--model.dim'"]),
        (["--model.dimm", "5"], ["--model.dimm"]),
        (["--seqlen", "8"], ["--seqlen", "did you mean '--seq-len'"]),
        (["--model.di=5"], ["--model.di"]),  # no prefix matching: a prefix must not pick a field
        (["stray"], ["'stray'"]),
    ],
)
def test_unknown_keys_on_cli(argv, names):
    with pytest.raises(ValueError) as info:
        load_config(argv)
    for name in names:
        assert name in str(info.value)


def test_print_config_parses_back(capsys, tmp_path):
    path = write(tmp_path, {"model": {"dim": 128}})
    argv = ["--config", path, "--optim.betas=0.85,0.9", "--optim.lr=1.5e-4", "--print-config"]
    with pytest.raises(SystemExit) as info:
        load_config(argv)
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert Config.from_dict(yaml.safe_load(printed)) == load_config(argv[:-1])
    assert "# model width" in printed  # fields carry their help as comments


def test_help_lists_shorthands_and_override_syntax(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--config", "--seq-len", "--steps", "--out", "--resume", "--seed", "--print-config"]:
        assert flag in text
    assert "--section.field=value" in text and "--parallel.cp_ulysses" in text


def test_save_and_dict_round_trip(tmp_path):
    cfg = load_config(["--optim.lr=1.23456789e-3", "--optim.betas=0.9,0.999", "--data.dataset=a: b #c", "--resume"])
    cfg.save(tmp_path / "out" / "config.yaml")
    assert Config.from_yaml(tmp_path / "out" / "config.yaml") == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(cfg.to_dict()).optim.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model.n_heads=12", "--model.n_kv_heads=5", "--model.dim=96"],
            "model.n_heads (12) must be divisible by model.n_kv_heads (5): set n_kv_heads to one of [1, 2, 3, 4, 6, 12",
        ),
        (["--steps=-3"], "train.steps (-3) must be >= 1"),
        (["--model.dim=66"], "model.dim (66)"),
        (["--parallel.dp_shard=0"], "parallel.dp_shard (0)"),
        (["--optim.lr=0"], "optim.lr (0.0) must be > 0"),
        (["--optim.betas=0.9,1.0"], "optim.betas"),
        (["--optim.min_lr=1", "--optim.lr=0.1"], "optim.min_lr (1.0) exceeds optim.lr (0.1)"),
        (["--model.n_full=9"], "model.n_full (9) exceeds model.n_layers (4)"),
        (["--model.span_size=0"], "model.span_size"),
        (["--parallel.cp_ulysses=8"], "parallel.tp × parallel.cp_ulysses (1 × 8)"),
        (["--parallel.cp_ring=3", "--seq-len=4096"], "data.seq_len (4096) must be a multiple of 6"),
        (["--parallel.pp=5"], "parallel.pp (5) exceeds model.n_layers (4)"),
        (["--parallel.layout=stripe", "--parallel.cp_ring=2", "--parallel.cp_ulysses=2"], "stripe"),
        (["--parallel.layout=balanced", "--data.doc_masking=false"], "it needs data.doc_masking=true"),
        (["--parallel.layout=balanced", "--parallel.cp_ring=2", "--parallel.cp_ulysses=2"], "use zigzag or auto"),
        (["--parallel.layout=auto", "--parallel.cp_ring=3", "--seq-len=4099"], "must be a multiple of 6"),
    ],
)
def test_validation_errors(argv, message):
    with pytest.raises(ValueError, match="invalid configuration") as info:
        load_config(argv)
    assert message in str(info.value)


def test_validation_lists_every_error():
    cfg = Config()
    cfg.train.steps, cfg.data.batch_size = 0, 0
    with pytest.raises(ValueError) as info:
        cfg.validate()
    assert "train.steps (0)" in str(info.value) and "data.batch_size (0)" in str(info.value)


def test_all_full_needs_no_span_size():
    cfg = load_config(["--model.full_layers=all", "--model.span_size=0"])
    assert cfg.model.layer_spans() == [("causal", 0)] * 4


def test_model_helpers():
    m = ModelConfig(dim=2048, n_layers=24, n_heads=16, full_layers="interleave", n_full=4, span="block", span_size=64)
    assert m.ffn_hidden == 5504 and m.head_dim == 128
    assert m.full_layer_ids() == [5, 11, 17, 23]
    assert m.layer_spans()[5] == ("causal", 0) and m.layer_spans()[0] == ("block", 64)
    assert ModelConfig(n_layers=6, full_layers="bottom", n_full=2).full_layer_ids() == [0, 1]
    assert ModelConfig(n_layers=6, full_layers="top", n_full=2).full_layer_ids() == [4, 5]
    assert ModelConfig(n_layers=6, full_layers="interleave", n_full=0).full_layer_ids() == []
    assert ModelConfig(ffn_dim=100).ffn_hidden == 100


def test_parallel_helpers():
    p = ParallelConfig(dp_replicate=2, dp_shard=-1, tp=2, cp_ring=2, cp_ulysses=2)
    assert p.cp == 4 and p.resolved(32).dp_shard == 2
    demo = ParallelConfig()  # the demo: the sequence is sharded over every rank
    assert demo.resolved(4).cp_ring == 4 and demo.resolved(4).dp_shard == 1
    with pytest.raises(ValueError, match="only one degree can fill"):
        load_config(["--parallel.dp_shard=-1"])
    with pytest.raises(ValueError, match=r"16 ranks do not fit a world of 12: the degrees parallel.dp_replicate=2 × "):
        p.resolved(12)
    with pytest.raises(ValueError, match="3 ranks do not fit a world of 32"):
        ParallelConfig(dp_shard=3, cp_ring=1).resolved(32)
    with pytest.raises(ValueError, match=r"multiply to 2 ranks, not the world of 4; set parallel\.dp_shard or"):
        ParallelConfig(tp=2, cp_ring=1).resolved(4)


def test_a_launcher_checks_the_degrees_against_its_world():
    with pytest.raises(ValueError) as info:
        load_config(["--parallel.tp=3"], world_size=2)
    problems = info.value.problems  # one line per failing check: the world and the heads
    assert any(p.startswith("3 ranks do not fit a world of 2") for p in problems), problems
    assert any("model.n_heads (4) must be divisible by parallel.tp" in p for p in problems), problems
    assert load_config(["--parallel.tp=2"], world_size=2).parallel.tp == 2


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "stripe", "balanced", "auto"])
def test_seq_len_divisor_is_the_shortest_unit_every_layout_of_the_config_shards(layout):
    from lsts.parallel.sharding import check_seq_len
    from lsts.train.data import AUTO_LAYOUTS

    for ring, uly in [(1, 1), (3, 1), (2, 4)]:
        p = ParallelConfig(cp_ring=ring, cp_ulysses=uly, layout=layout)
        div, names = p.seq_len_divisor, AUTO_LAYOUTS if layout == "auto" else (layout,)
        for name in names:  # "auto" may pick any of them, row by row
            check_seq_len(3 * div, name, p.cp)
        for shorter in range(1, div):
            with pytest.raises(ValueError, match="cannot be split"):
                for name in names:
                    check_seq_len(shorter, name, p.cp)


def test_backend_choices_match_kernels():
    import typing

    from lsts.config import KernelsConfig
    from lsts.kernels import backend

    hints = typing.get_type_hints(KernelsConfig)
    for name in ["attention", "loss", "norm", "rope"]:
        assert typing.get_args(hints[name]) == backend.BACKENDS
