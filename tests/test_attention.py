"""The attention kernel a run uses: recorded from the run's own calls, timed, cached, applied."""

from __future__ import annotations

import pytest
import torch

from clipx.models import attention
from clipx.models.attention import (
    AttentionCall,
    AttentionKernel,
    attend,
    cached_choice,
    choose_kernel,
    explicit_attention,
    record_attention_calls,
)
from tests.conftest import TINY_ARCH, tiny_overrides

BATCH = 4


@pytest.fixture(scope="module")
def tiny_clip(tiny_model_json):
    from clipx.config import load_config
    from clipx.models.factory import create_model

    torch.manual_seed(0)
    return create_model(load_config(None, [f"model.name={tiny_model_json}", "data.train=unused"]).model)


def _inputs():
    vision, text = TINY_ARCH["vision_cfg"], TINY_ARCH["text_cfg"]
    return (torch.randn(BATCH, 3, vision["image_size"], vision["image_size"]),
            torch.randint(0, 100, (BATCH, text["context_length"])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_recorded_calls_are_the_towers_attention_in_the_precision_of_the_run(tiny_clip, dtype):
    vision, text = TINY_ARCH["vision_cfg"], TINY_ARCH["text_cfg"]
    images, tokens = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        calls = record_attention_calls(lambda: tiny_clip(images, tokens))
    patches = (vision["image_size"] // vision["patch_size"]) ** 2 + 1  # + the class token
    vision_heads = vision["width"] // vision["head_width"]
    expected_vision = (BATCH, vision_heads, patches, vision["head_width"])
    expected_text = (BATCH, text["heads"], text["context_length"], text["width"] // text["heads"])
    assert [c.query for c in calls] == [expected_vision] * vision["layers"] + [expected_text] * text["layers"]
    assert all(c.dtype == str(dtype).removeprefix("torch.") for c in calls)
    assert [c.mask is not None for c in calls] == [False] * vision["layers"] + [True] * text["layers"], \
        "the text tower's causal mask must be recorded: kernels differ in the masks they serve"
    assert {c.chosen_by_torch for c in calls} == {"flash"}  # PyTorch's pick on the CPU
    assert all(c.explicit_exact for c in calls), "open_clip towers attend through clipx's attend"


def test_only_calls_through_attend_that_leave_every_row_a_key_are_exact_for_the_explicit_kernel():
    q = torch.randn(2, 2, 5, 8)
    causal = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    blocks_a_row = causal.clone()
    blocks_a_row[2] = float("-inf")
    per_sample = causal.expand(2, 2, 5, 5)
    calls = record_attention_calls(lambda: [
        attend(q, q, q), attend(q, q, q, attn_mask=causal), attend(q, q, q, is_causal=True),
        attend(q, q, q, attn_mask=blocks_a_row), attend(q, q, q, attn_mask=per_sample),
        torch.nn.functional.scaled_dot_product_attention(q, q, q)])  # another tower's own call
    assert [c.explicit_exact for c in calls] == [True, True, True, False, False, False]


@pytest.mark.parametrize("masking", ["none", "causal", "additive", "per-sample"])
def test_the_explicit_kernel_is_sdpa_in_value_and_gradients(masking):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 16, requires_grad=True) for _ in range(3))
    mask = {"none": None, "causal": None, "additive": torch.randn(7, 7),
            "per-sample": torch.randn(3, 1, 7, 7)}[masking]
    causal = masking == "causal"
    outputs = [f(q, k, v, attn_mask=mask, is_causal=causal)
               for f in (torch.nn.functional.scaled_dot_product_attention, explicit_attention)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in outputs]
    for ours, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_a_restricted_scope_takes_the_fused_kernel_away(tiny_clip):
    images, tokens = _inputs()
    with AttentionKernel("math").scope():
        assert record_attention_calls(lambda: tiny_clip(images, tokens)) == []
    with AttentionKernel("default").scope():
        assert len(record_attention_calls(lambda: tiny_clip(images, tokens))) == 3


CALL = AttentionCall((8, 2, 17, 32), (8, 2, 17, 32), (8, 2, 17, 32), "float32", "cpu")
MASKED = AttentionCall((8, 2, 16, 32), (8, 2, 16, 32), (8, 2, 16, 32), "float32", "cpu", mask=(16, 16),
                       mask_dtype="float32")


def _fake_timings(monkeypatch, table):
    monkeypatch.setattr(attention, "time_call", lambda call, kernel, backward: table[call, kernel])


def test_the_fastest_kernel_wins_only_by_a_clear_margin(monkeypatch):
    _fake_timings(monkeypatch, {(CALL, "flash"): 1.0, (CALL, "math"): 0.5, (MASKED, "flash"): 1.0,
                                (MASKED, "math"): 0.6})
    kernel, seconds = choose_kernel([CALL, CALL, MASKED], backward=True)
    assert kernel == "math" and seconds == {"math": 1.6, "flash": 3.0, "default": 3.0}
    # 3% faster is within noise: PyTorch's own pick stays.
    _fake_timings(monkeypatch, {(CALL, "flash"): 1.0, (CALL, "math"): 0.97})
    assert choose_kernel([CALL], backward=True)[0] == "default"


EXACT = AttentionCall((8, 2, 17, 32), (8, 2, 17, 32), (8, 2, 17, 32), "float32", "cpu", explicit_exact=True)


def test_the_explicit_kernel_is_a_candidate_only_when_it_computes_every_call_exactly(monkeypatch):
    table = {(call, kernel): 1.0 for call in (CALL, EXACT) for kernel in ("math", "flash")}
    _fake_timings(monkeypatch, {**table, (EXACT, "explicit"): 0.4, (CALL, "explicit"): 0.4})
    assert choose_kernel([EXACT, EXACT], backward=True) == ("explicit", {"math": 2.0, "flash": 2.0,
                                                                         "explicit": 0.8, "default": 2.0})
    kernel, seconds = choose_kernel([EXACT, CALL], backward=True)
    assert kernel == "default" and "explicit" not in seconds
    # Inference: each process chooses alone, so no kernel whose forward timing is close to SDPA's.
    kernel, seconds = choose_kernel([EXACT, EXACT], backward=False)
    assert kernel == "default" and "explicit" not in seconds


def test_a_kernel_that_cannot_run_every_call_is_never_chosen(monkeypatch):
    _fake_timings(monkeypatch, {(CALL, "flash"): 1.0, (CALL, "math"): 0.1, (MASKED, "flash"): 1.0,
                                (MASKED, "math"): float("inf")})
    assert choose_kernel([CALL, MASKED], backward=False)[0] == "default"


def _rule(seconds: dict) -> str:
    """The choice the timings make: the fastest, if clearly faster than PyTorch's picks."""
    best = min(seconds, key=seconds.get)
    return best if seconds[best] < seconds["default"] * (1 - attention.MARGIN) else "default"


def test_real_timings_choose_a_kernel_that_runs_the_calls():
    kernel, seconds = choose_kernel([CALL, MASKED], backward=True)
    assert set(seconds) == {"math", "flash", "default"} and all(0 < s < float("inf") for s in seconds.values())
    assert kernel == _rule(seconds), "the choice must be the one its own measurement made"
    kernel, seconds = choose_kernel([EXACT], backward=True)
    assert set(seconds) == {"math", "flash", "explicit", "default"}
    assert all(0 < s < float("inf") for s in seconds.values()) and kernel == _rule(seconds)


def test_a_choice_is_measured_once_per_machine_and_calls(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPX_CACHE_DIR", str(tmp_path))
    measured = []
    monkeypatch.setattr(attention, "choose_kernel", lambda calls, backward: measured.append(calls) or ("math", {}))
    assert cached_choice([CALL], backward=True) == ("math", {}, False)
    assert cached_choice([CALL], backward=True) == ("math", {}, True)
    assert cached_choice([CALL], backward=False)[2] is False  # inference is another question
    assert len(measured) == 2 and (tmp_path / "attention-kernels.json").is_file()


def test_settling_leaves_the_random_stream_as_it_was(tiny_clip):
    images, tokens = _inputs()
    before = torch.get_rng_state()
    kernel = AttentionKernel("auto")
    chosen = kernel.settle(lambda: tiny_clip(images, tokens), backward=True)
    assert chosen in ("default", "math", "flash", "explicit") and kernel.settled
    assert torch.equal(torch.get_rng_state(), before)
    assert kernel.describe().startswith(f"attention kernel: {chosen} (measured: ")


def _kernel_timings(monkeypatch, **seconds):
    """Every call takes ``seconds[kernel]`` ("default", PyTorch's pick, as flash), and no cache
    answers instead of the measurement (CLIPX_CACHE_DIR=off): a run's choice follows these timings."""
    monkeypatch.setenv("CLIPX_CACHE_DIR", "off")
    table = {"default": seconds["flash"], **seconds}
    monkeypatch.setattr(attention, "time_call", lambda call, kernel, backward, repeats=5: table[kernel])


def test_a_run_uses_the_measured_fastest_kernel_resumes_with_it_and_a_fixed_one_is_used_as_set(
        digits_dir, tiny_model_json, tmp_path, monkeypatch, capsys):
    import json

    from clipx.config import load_config
    from clipx.run_layout import list_checkpoints
    from clipx.train.loop import train

    def overrides(**extra):
        return tiny_overrides(digits_dir, tiny_model_json, tmp_path / "auto", **{
            "train.precision": "bf16", "data.val": "null", **extra})

    # The timings decide, not a fixed preference: math here, explicit (another kernel) below.
    _kernel_timings(monkeypatch, math=1.0, flash=2.0, explicit=3.0)
    auto = train(load_config(None, overrides(**{"train.steps": 2})))
    assert auto["attention_kernel"] == "math"
    saved = json.loads((list_checkpoints(tmp_path / "auto")[-1] / "trainer_state.json").read_text())
    assert saved["attention_kernel"] == "math"
    # A resume (no cache: another machine, say) where measuring would choose explicit continues
    # with the kernel it trained with.
    _kernel_timings(monkeypatch, explicit=1.0, math=3.0, flash=2.0)
    resumed = train(load_config(None, overrides(**{"train.steps": 3})), resume="latest")
    assert resumed["steps"] == 3 and resumed["attention_kernel"] == "math"
    assert "attention kernel: math (the kernel of the checkpoint this run resumed from)" in capsys.readouterr().out
    fixed = train(load_config(None, tiny_overrides(digits_dir, tiny_model_json, tmp_path / "explicit", **{
        "train.steps": 2, "train.attention": "explicit", "data.val": "null"})))
    assert fixed["attention_kernel"] == "explicit"


def _settled(kernel: AttentionKernel, backward: bool = True) -> str:
    return kernel.settle(lambda: attend(*(torch.randn(2, 2, 5, 8) for _ in range(3))), backward=backward)


def test_a_saved_kernel_is_used_only_by_auto_and_only_where_the_device_has_it(monkeypatch):
    _kernel_timings(monkeypatch, explicit=1.0, math=3.0, flash=2.0)
    resumed = AttentionKernel("auto")
    resumed.resume_with("math")
    assert _settled(resumed) == "math" and resumed.origin == "checkpoint"
    old = AttentionKernel("auto")
    old.resume_with(None)  # a checkpoint from before kernels were saved: measured as before
    assert _settled(old) == "explicit" and old.origin == "measured"
    from_a_gpu = AttentionKernel("auto")
    from_a_gpu.resume_with("cudnn")  # SDPA has no cuDNN kernel on the CPU: measured instead
    assert _settled(from_a_gpu) == "explicit"
    fixed = AttentionKernel("flash")
    fixed.resume_with("math")  # train.attention set by name wins over the checkpoint
    assert _settled(fixed) == "flash"


def test_a_checkpoint_without_a_saved_kernel_still_loads(tmp_path):
    from clipx.train.checkpoint import load_trainer_state

    (tmp_path / "trainer_state.json").write_text(
        '{"step": 3, "batches": 3, "epoch": 0, "world_size": 1, "guard": {}, "skips_by_epoch": {}}')
    assert load_trainer_state(tmp_path).attention_kernel is None


def test_the_kernel_cache_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "off" must not become a folder named off
    monkeypatch.setenv("CLIPX_CACHE_DIR", "off")
    measured = []
    monkeypatch.setattr(attention, "choose_kernel", lambda calls, backward: measured.append(calls) or ("math", {}))
    assert cached_choice([CALL], backward=True) == ("math", {}, False)
    assert cached_choice([CALL], backward=True) == ("math", {}, False)
    assert len(measured) == 2 and list(tmp_path.iterdir()) == []


def test_inference_ranks_use_rank_0s_kernel(monkeypatch, tiny_clip):
    """Rank 1 of a sharded evaluation, faked: its own timings would choose flash, rank 0's chose math."""
    from clipx import dist
    from clipx.models.inference import InferenceEncoder

    _kernel_timings(monkeypatch, math=2.0, flash=1.0)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    sent = {"image": ("math", {"math": 1.0}, "measured"), "text": ("math", {"math": 1.0}, "measured")}
    towers = iter(sent)
    # What a broadcast from rank 0 gives rank 1, whatever rank 1 holds.
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: sent[next(towers)])
    images, tokens = _inputs()
    encoder = InferenceEncoder(tiny_clip, torch.device("cpu"))
    assert encoder.settle({"image": images, "text": tokens}) == {"image": "math", "text": "math"}
    # Alone (a single process, no settle first), the same timings choose PyTorch's flash pick.
    alone = InferenceEncoder(tiny_clip, torch.device("cpu"))
    alone.encode_image(images)
    assert alone.kernels["image"].kernel == "default"


def test_settling_an_inference_kernel_leaves_a_training_models_batchnorm_alone(tiny_clip):
    """Evaluation during training hands a model in train mode to InferenceEncoder.settle: its example
    passes must run in eval mode (a training-mode pass on zero images moved the running statistics)."""
    from clipx.models.inference import InferenceEncoder

    probe = torch.nn.BatchNorm1d(TINY_ARCH["embed_dim"])
    probe.running_mean.fill_(5.0)
    model = torch.nn.Module()
    model.clip, model.probe = tiny_clip, probe
    model.encode_image = lambda images: probe(tiny_clip.encode_image(images))
    model.encode_text = tiny_clip.encode_text
    model.train()
    images, tokens = _inputs()
    InferenceEncoder(model, torch.device("cpu")).settle({"image": images, "text": tokens})
    assert torch.equal(probe.running_mean, torch.full_like(probe.running_mean, 5.0))
    assert int(probe.num_batches_tracked) == 0
    assert model.training and probe.training  # the caller's mode is given back
