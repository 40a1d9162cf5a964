"""The byte-level language model, its throughput/MFU accounting, corpus and config: pure torch, no Ray."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.config import load_config
from runtime.data import generate_text, load_text_tokens
from runtime.errors import ConfigError, DataError, DatasetNotFoundError
from runtime.models import CharTransformerLM, build_model, flops_per_token, num_parameters
from runtime.training import (
    LMJobConfig,
    LMObjective,
    LoopState,
    lr_factor,
    make_optimizer,
    make_scheduler,
    prepare_corpus,
    sample_windows,
    split_tokens,
    train_step,
)
from runtime.training.callbacks import PEAK_ENV, Throughput, ThroughputMeter, _throughput, mfu, peak_flops

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def _model(**kw: int) -> CharTransformerLM:
    torch.manual_seed(0)
    return CharTransformerLM(**{"d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": 16, **kw})


# --- the model --------------------------------------------------------------------------


def test_forward_shapes_and_build_model():
    model = build_model(
        {"architecture": "char_lm", "input_dim": 256, "output_dim": 256, "d_model": 32, "n_heads": 4, "n_layers": 1,
         "seq_len": 16}
    )  # fmt: skip
    assert isinstance(model, CharTransformerLM)
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    assert model(idx[:, :5]).shape == (3, 5, 256)  # shorter than seq_len is fine
    with pytest.raises(ValueError, match="17 tokens but the model's seq_len is 16"):
        model(torch.randint(0, 256, (1, 17)))
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        CharTransformerLM(d_model=30, n_heads=4)


def test_attention_is_causal():
    model = _model().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])  # the past never sees the future
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_embeddings_are_tied_and_counted_once():
    d, layers, seq, vocab = 32, 2, 16, 256
    model = _model()
    assert model.head.weight is model.tok_emb.weight
    non_embedding = layers * (12 * d * d + 13 * d) + 2 * d  # per block: qkv, proj, 2-layer MLP, 2 LayerNorms
    assert num_parameters(model, exclude_embeddings=True) == non_embedding
    assert num_parameters(model) == non_embedding + vocab * d + seq * d  # the head adds nothing
    with torch.no_grad():
        model.tok_emb.weight[7].fill_(0.5)
    assert torch.equal(model.head.weight[7], torch.full((d,), 0.5))


def test_flops_per_token_formula():
    # GPT-2 small shape: 12 layers, d_model 768, 1024 context, ~85M non-embedding parameters.
    n = 12 * (12 * 768**2 + 13 * 768) + 2 * 768
    assert flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(1000, 2, 64, 64) == 6000.0 + 12 * 2 * 64 * 64


def test_checkpoint_round_trip_keeps_the_tie(tmp_path):
    from safetensors.torch import load_model, save_model

    model, other = _model(), _model(n_layers=2)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    save_model(model, str(tmp_path / "m.safetensors"))
    load_model(other, str(tmp_path / "m.safetensors"))
    assert other.head.weight is other.tok_emb.weight
    idx = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(model.eval()(idx), other.eval()(idx))


# --- peak FLOPs, MFU, throughput ---------------------------------------------------------


@pytest.fixture
def no_peak_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_ENV, raising=False)


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "bf16", 835.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA H200", "fp16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA A10G", "bf16", 70.0),
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16", 312.0 * 3 / 7),
    ],
)
def test_peak_flops_table(no_peak_override: None, name: str, dtype: str, tflops: float):
    assert peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


def test_peak_flops_unknown_is_none(no_peak_override: None):
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA L40S") is None  # not the L4
    assert peak_flops("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(ValueError, match="dtype 'int8'"):
        peak_flops("NVIDIA H100", "int8")


def test_peak_flops_env_override(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(PEAK_ENV, "123.5")
    assert peak_flops("cpu") == pytest.approx(123.5e12)
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(123.5e12)
    for bad in ("fast", "-1", "0"):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(ConfigError, match=f"{PEAK_ENV}='{bad}' must be a positive number of TFLOP/s"):
            peak_flops("cpu")


def test_mfu_math():
    assert mfu(1_000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(1_000.0, 6e9, None) is None
    assert mfu(None, 6e9, 1e13) is None


def test_throughput_excludes_warmup(monkeypatch: pytest.MonkeyPatch):
    clock = iter([0.0, 10.0, 10.0, 11.0, 11.0, 12.0])  # a 10 s first step, then 1 s steps
    monkeypatch.setattr(_throughput.time, "perf_counter", lambda: next(clock))
    syncs: list[int] = []
    meter = Throughput(warmup_steps=1, sync=lambda: syncs.append(1))
    assert meter.tokens_per_s is None
    meter.start()
    meter.stop(100)
    assert meter.tokens_per_s == pytest.approx(10.0)  # only the warm-up so far: its own estimate
    for _ in range(2):
        meter.start()
        meter.stop(100)
    assert meter.tokens_per_s == pytest.approx(100.0)
    assert meter.steps == 3 and len(syncs) == 6
    with pytest.raises(RuntimeError, match="without start"):
        meter.stop(1)


# --- the corpus ---------------------------------------------------------------------------


def test_generate_text_is_deterministic_exact_and_prefix_stable(tmp_path):
    a = generate_text(tmp_path / "a.txt", 50_000, seed=3).read_bytes()
    b = generate_text(tmp_path / "b.txt", 50_000, seed=3).read_bytes()
    longer = generate_text(tmp_path / "c.txt", 120_000, seed=3).read_bytes()
    other = generate_text(tmp_path / "d.txt", 50_000, seed=4).read_bytes()
    assert a == b and len(a) == 50_000 and longer[:50_000] == a and other != a
    text = a.decode("utf-8")
    assert text.isascii() and "\n\n" in text and all(c in text for c in '.,?"')
    words = {w.strip('.,?!"').lower() for w in text.split()}
    assert 200 < len(words) < 1000  # a few hundred words, inflections included
    assert list(tmp_path.glob(".*tmp*")) == []  # written via a temp file and renamed
    with pytest.raises(ConfigError, match=r"n_bytes \(0\) must be >= 1"):
        generate_text(tmp_path / "e.txt", 0)


def test_load_text_tokens(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\n", encoding="utf-8")
    tokens = load_text_tokens(path)
    assert tokens.dtype == np.uint8 and tokens.tobytes() == "héllo\n".encode()
    with pytest.raises(DatasetNotFoundError, match="data.generate: true"):
        load_text_tokens(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        load_text_tokens(tmp_path / "empty.txt")


def test_split_and_sample_windows():
    tokens = np.arange(1000, dtype=np.uint8)  # wraps at 256, fine for the shift check
    train, valid = split_tokens(tokens, 0.1, seq_len=16)
    assert len(train) == 900 and len(valid) == 100
    windows = sample_windows(train, np.random.default_rng(0), batch_size=4, seq_len=16)
    assert windows.shape == (4, 17) and windows.dtype == np.int64  # inputs and the next-token targets
    assert np.array_equal((windows[:, :-1] + 1) % 256, windows[:, 1:])
    with pytest.raises(DataError, match=r"too few for seq_len \(600\)"):
        split_tokens(tokens, 0.1, seq_len=600)


def test_prepare_corpus(tmp_path):
    base = {"path": str(tmp_path / "c.txt"), "n_bytes": 4096}
    with pytest.raises(DatasetNotFoundError, match="set data.generate: true"):
        prepare_corpus(load_config(LMJobConfig, {"data": base}).data)
    cfg = load_config(LMJobConfig, {"data": {**base, "generate": True}})
    assert prepare_corpus(cfg.data).stat().st_size == 4096


# --- training -----------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, "cosine", warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    assert lr_factor(12, "cosine", 4, 20, 0.0) == pytest.approx(0.5)  # half way down the cosine
    assert lr_factor(12, "constant", 4, 20) == 1.0


def _eval_loss(model: torch.nn.Module, batches: list[dict[str, np.ndarray]]) -> float:
    objective = LMObjective()
    model.eval()
    with torch.no_grad():
        sums = [objective.eval_sums(model, b, torch.device("cpu")) for b in batches]
    model.train()
    return objective.eval_metrics({k: sum(s[k] for s in sums) for k in sums[0]})["valid_loss"]


def test_a_few_dozen_steps_of_the_shared_step_reduce_loss(tmp_path):
    tokens = load_text_tokens(generate_text(tmp_path / "c.txt", 100_000, seed=1))
    train, valid = split_tokens(tokens, 0.1, seq_len=32)
    model = _model(seq_len=32, d_model=64)
    optimizer = make_optimizer(model, "adamw", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = make_scheduler(optimizer, "cosine", total_steps=40, warmup_steps=4, min_lr_ratio=0.1)
    state = LoopState(
        rank=0, world_size=1, epochs=1, batch_size=16, micro_batch_size=8, model=model, optimizer=optimizer
    )
    rng, eval_rng = np.random.default_rng(0), np.random.default_rng(1)
    eval_set = [{"tokens": sample_windows(valid, eval_rng, 16, 32)} for _ in range(4)]
    before = _eval_loss(model, eval_set)
    assert before == pytest.approx(math.log(256), abs=0.3)  # a fresh model is near uniform
    losses = []
    for _ in range(40):
        batch = {"tokens": sample_windows(train, rng, 16, 32)}
        losses.append(float(train_step(state, batch, LMObjective(), torch.device("cpu"), grad_clip=1.0)) / (16 * 32))
        scheduler.step()
    after = _eval_loss(model, eval_set)
    assert after < before - 1.5, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert scheduler.get_last_lr()[0] == pytest.approx(3e-3 * 0.1)


def test_optimizer_decays_only_matrices():
    model = _model()
    optimizer = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == num_parameters(model)


def test_greedy_generation_continues_a_prompt():
    model = _model().eval()
    out = model.generate(b"the quick", 5)
    assert isinstance(out, bytes) and len(out) == 5
    assert model.generate(b"the quick", 5) == out  # greedy: deterministic


# --- the job config -----------------------------------------------------------------------


def test_shipped_configs_validate(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SKEWLESS_HOME", "/srv/home")
    tiny = load_config(LMJobConfig, CONFIGS / "lm_tiny.yaml")
    assert tiny.data.path == "/srv/home/data/corpus.txt" and tiny.data.generate
    assert not tiny.training.use_gpu and tiny.training.num_workers == 1
    gpu = load_config(LMJobConfig, CONFIGS / "lm_gpu.yaml")
    assert gpu.training.use_gpu and gpu.training.precision == "bf16" and gpu.model.d_model == 768
    with torch.device("meta"):
        big = build_model(gpu.model.artifact_config(gpu.model.io))
    assert 80e6 < num_parameters(big) < 90e6
    large = load_config(LMJobConfig, CONFIGS / "lm_gpu_large.yaml")
    assert large.training.compile and large.training.tokens_on_device and large.training.use_gpu
    with torch.device("meta"):
        assert 330e6 < num_parameters(build_model(large.model.artifact_config(large.model.io))) < 350e6


def test_config_errors_name_field_value_and_fix(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SKEWLESS_HOME", raising=False)
    data = {"path": "${SKEWLESS_HOME}/corpus.txt"}
    assert load_config(LMJobConfig, {"data": data}).data.path.endswith("/.skewless/corpus.txt")
    with pytest.raises(ConfigError) as exc:
        load_config(LMJobConfig, {"data": data, "model": {"d_model": 100, "n_heads": 3}})
    assert "d_model (100) must be divisible by n_heads (3)" in str(exc.value) and "e.g. d_model 99" in str(exc.value)
    with pytest.raises(ConfigError, match=r"training.stpes: unknown key 'stpes' \(did you mean 'steps'\?\)"):
        load_config(LMJobConfig, {"data": data, "training": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"warmup_steps \(50\) must be <= steps \(10\)"):
        load_config(LMJobConfig, {"data": data, "training": {"steps": 10, "warmup_steps": 50}})
    with pytest.raises(ConfigError, match="training.precision: value 'fp16' breaks rule"):
        load_config(LMJobConfig, {"data": data, "training": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match="must be a local file path"):
        load_config(LMJobConfig, {"data": {"path": "s3://bucket/corpus.txt"}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_steps_on_gpu_and_a_known_peak():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = CharTransformerLM(d_model=128, n_heads=4, n_layers=2, seq_len=128).to(device)
    optimizer = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    state = LoopState(
        rank=0, world_size=1, epochs=1, batch_size=8, micro_batch_size=8, model=model, optimizer=optimizer
    )
    tokens = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 200, dtype=np.uint8)
    rng = np.random.default_rng(0)
    meter = Throughput(warmup_steps=2, sync=torch.cuda.synchronize)
    losses = []
    for _ in range(20):
        meter.start()
        batch = {"tokens": sample_windows(tokens, rng, 8, 128)}
        losses.append(float(train_step(state, batch, LMObjective(), device, "bf16", grad_clip=1.0)) / (8 * 128))
        meter.stop(8 * 128)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert next(model.parameters()).device.type == "cuda"
    assert meter.tokens_per_s is not None and meter.tokens_per_s > 0
    name = torch.cuda.get_device_name(device)
    if any(k in name for k in ("H100", "H200", "A100", "A10G")) and PEAK_ENV not in os.environ:
        fpt = flops_per_token(num_parameters(model, exclude_embeddings=True), 2, 128, 128)
        utilization = mfu(meter.tokens_per_s, fpt, peak_flops(name, "bf16"))
        assert utilization is not None and 0 < utilization < 1


def test_the_meter_syncs_at_window_edges_not_every_step(monkeypatch: pytest.MonkeyPatch):
    """A device sync per step would stop the host from queueing the next step while the GPU
    runs this one: the meter reads the clock when an epoch starts and ends, and once where
    the warm-up ends."""
    ticks = iter(float(t) for t in range(100))
    monkeypatch.setattr(_throughput.time, "perf_counter", lambda: next(ticks))
    syncs: list[int] = []
    meter = ThroughputMeter(flops_per_token=1.0, precision="fp32", warmup_steps=2)
    meter.on_run_start(LoopState(rank=0, world_size=1, epochs=2, batch_size=1, micro_batch_size=1))
    meter._sync = lambda: syncs.append(1)
    state = LoopState(rank=0, world_size=1, epochs=2, batch_size=1, micro_batch_size=1)
    for _epoch in range(2):
        meter.on_epoch_start(state)
        for _ in range(5):
            state.last_count = 10
            meter.on_step_end(state)
        meter.on_epoch_end(state)
    # clock reads: epoch 1 start (t=0), warm-up end (1 close, 2 reopen), epoch 1 end (3),
    # epoch 2 start (4) and end (5): 6 syncs for 10 steps
    assert len(syncs) == 6
    # after the warm-up: 3 steps in 1 s (t 2..3) and 5 steps in 1 s (t 4..5): 80 tokens / 2 s
    assert state.metrics["tokens_per_s"] == pytest.approx(40.0)


def test_evaluation_after_the_steps_is_not_in_the_window(monkeypatch: pytest.MonkeyPatch):
    """The loop fires on_epoch_train_end before it evaluates: 10 s of evaluation between it
    and on_epoch_end must not count as training time."""
    now = [0.0]
    monkeypatch.setattr(_throughput.time, "perf_counter", lambda: now[0])
    meter = ThroughputMeter(flops_per_token=1.0, precision="fp32", warmup_steps=0)
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=1, micro_batch_size=1)
    meter.on_run_start(state)
    meter._sync = None
    meter.on_epoch_start(state)
    for _ in range(4):
        now[0] += 1.0  # a step takes 1 s
        state.last_count = 10
        meter.on_step_end(state)
    meter.on_epoch_train_end(state)
    now[0] += 10.0  # evaluation
    meter.on_epoch_end(state)
    assert state.metrics["tokens_per_s"] == pytest.approx(10.0)  # 40 tokens in 4 s, not in 14 s


def test_windows_cut_on_the_device_are_the_host_windows():
    """The device path (here on the CPU device) draws the same starts and cuts the same windows."""
    from runtime.training import TokenSource

    tokens = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 50, dtype=np.uint8)
    args = (tokens, tokens[:200], 1, 4, 32, 6, 3, 1, 7)
    host, device = TokenSource(*args), TokenSource(*args, device=torch.device("cpu"))
    for epoch in range(2):
        for a, b in itertools.zip_longest(host.batches(epoch), device.batches(epoch, skip=0)):
            assert isinstance(b["tokens"], torch.Tensor) and b["tokens"].dtype == torch.int64
            assert np.array_equal(a["tokens"], b["tokens"].numpy())
