"""The transformers attention backend on real models (Llama, Qwen2, Qwen3 from small configs, random weights,
fp32 on CPU; no hub downloads)."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
import routing_kernels.integrations.transformers as rkt  # noqa: E402

rkt.register()
VOCAB = 97


def _model(family: str, chunk_size: int, top_k: int, *, layers: int = 2, **routing):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    config = cls[0](vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, head_dim=16)
    config.routed_attention = {"chunk_size": chunk_size, "top_k": top_k, **routing}
    torch.manual_seed(0)
    return cls[1](config).eval()


def _twin(model, implementation: str, **routing):
    """The same weights under another attention implementation (deep copy: configs are shared otherwise)."""
    other = copy.deepcopy(model)
    other.config.routed_attention = {**other.config.routed_attention, **routing}
    other.set_attn_implementation(implementation)
    return other


def _ids(batch=2, n=80, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_top_k_covering_everything_equals_sdpa_and_generates_the_same(family):
    routed = _model(family, chunk_size=16, top_k=100)
    routed.set_attn_implementation("routed")
    sdpa = _twin(routed, "sdpa")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(routed(ids).logits, sdpa(ids).logits, rtol=1e-5, atol=1e-5)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=32, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(routed.generate(ids, **kw), sdpa.generate(ids, **kw))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_small_top_k_equals_the_reference_backend(family):
    routed = _model(family, chunk_size=8, top_k=2)
    routed.set_attn_implementation("routed")
    reference = _twin(routed, "routed", backend="reference")
    ids = _ids()
    with torch.no_grad():
        got, want = routed(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the routing matters: dense attention gives other logits
        assert (got - _twin(routed, "sdpa")(ids).logits).abs().max() > 1e-3


def test_generate_with_the_cache_equals_rerunning_the_prefix():
    routed = _model("llama", chunk_size=8, top_k=2)
    routed.set_attn_implementation("routed")
    ids = _ids(n=37)
    kw = dict(max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(routed.generate(ids, **kw), routed.generate(ids, use_cache=False, **kw))


def test_training_step_gradients_equal_the_reference_backend():
    routed = _model("qwen2", chunk_size=8, top_k=2).train()
    routed.set_attn_implementation("routed")
    reference = _twin(routed, "routed", backend="reference").train()
    ids = _ids(n=50)
    grads = []
    for model in (routed, reference):
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_are_varlen_sequences(side):
    routed = _model("llama", chunk_size=8, top_k=2)
    routed.set_attn_implementation("routed")
    ids = _ids(batch=3, n=40)
    lengths = [40, 23, 7]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, 40 - n:] = 1
        else:
            mask[b, :n] = 1
    with torch.no_grad():
        batched = routed(ids, attention_mask=mask).logits
        assert not batched.isnan().any()
        for b, n in enumerate(lengths):  # every row as if it were alone
            rows = slice(40 - n, 40) if side == "left" else slice(0, n)
            alone = routed(ids[b:b + 1, rows]).logits[0]
            torch.testing.assert_close(batched[b, rows], alone, rtol=1e-5, atol=1e-5)


def test_padded_generate_equals_unpadded_rows():
    routed = _model("llama", chunk_size=8, top_k=2)
    routed.set_attn_implementation("routed")
    ids = _ids(batch=2, n=30)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding, as generate expects
    out = routed.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    alone = routed.generate(ids[1:, 11:], attention_mask=mask[1:, 11:], max_new_tokens=12, do_sample=False,
                            pad_token_id=0)
    new = alone[0, 19:]  # generation may stop early at EOS; the batched row is then padded
    assert new.numel() > 0 and torch.equal(out[1, 30:30 + new.numel()], new)


def test_dense_layers_stay_dense():
    routed = _model("llama", chunk_size=8, top_k=2, dense_layers=[0, 1])
    routed.set_attn_implementation("routed")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(routed(ids).logits, _twin(routed, "sdpa")(ids).logits, rtol=1e-5, atol=1e-5)


def test_compiled_forward_has_no_graph_break():
    routed = _model("llama", chunk_size=8, top_k=2, layers=1)
    routed.set_attn_implementation("routed")
    ids = _ids(batch=1, n=40)
    torch._dynamo.reset()
    compiled = torch.compile(routed, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, routed(ids).logits, rtol=1e-5, atol=1e-5)


def test_config_errors_are_clear():
    model = _model("llama", chunk_size=8, top_k=2)
    model.config.routed_attention = None
    model.set_attn_implementation("routed")
    with pytest.raises(ValueError, match=r"needs config.routed_attention = \{'chunk_size'"):
        model(_ids(n=5))
    model.config.routed_attention = {"chunk_size": 8, "topk": 2}
    with pytest.raises(ValueError, match=r"unknown keys \['topk'\]"):
        model(_ids(n=5))


def test_register_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'transformers>=5'"):
        rkt.register()


def test_generate_with_routed_cache_decodes_over_chunk_sums(monkeypatch):
    """RoutedCache: the same tokens as re-running the prefix, and every decode step took the cache layout
    (seqused_k + the cache's key sums), growing past its initial capacity on the way."""
    routed = _model("llama", chunk_size=8, top_k=2)
    routed.set_attn_implementation("routed")
    ids = _ids(n=37)
    kw = dict(max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    calls = []
    real = rkt.routed_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("seqused_k") is not None and kwargs.get("key_sums") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(rkt, "routed_attention", spy)
    cache = rkt.RoutedCache(routed.config, initial_capacity=16)
    got = routed.generate(ids, cache=cache, **kw)
    monkeypatch.setattr(rkt, "routed_attention", real)
    assert torch.equal(got, routed.generate(ids, use_cache=False, **kw))
    steps = got.shape[1] - ids.shape[1] - 1  # the first token comes from the prefill
    assert calls.count(True) == 2 * steps and calls[:2] == [False, False]  # 2 layers; prefill is not decode
    assert cache.layers[0].store.capacity >= got.shape[1] - 1 > 16
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.layers[0].crop(-1)
