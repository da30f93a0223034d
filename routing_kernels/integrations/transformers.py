"""A HuggingFace transformers (>= 5) attention backend that runs routed attention.

    import routing_kernels.integrations.transformers as rkt
    rkt.register()                                        # once; adds attn_implementation="routed"
    config.routed_attention = {"chunk_size": 512, "top_k": 8}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="routed")   # or from_pretrained(...)
    model.set_attn_implementation("routed")              # or switch an existing model

``config.routed_attention`` (a dict; never ``config.top_k``, which ``generate()`` reads as a sampling knob):
    chunk_size (int, required), top_k (int, required, counts the own chunk), dense_layers (list of layer
    indices that keep dense attention, as MoBA's recipe keeps some layers full; default none), backend
    (passed to :func:`routing_kernels.routed_attention`: None picks, "reference" runs the eager reference).

What the backend does with what transformers passes (query/key/value (B, H, N, D), output (B, N, H, D)):
- GQA without repeat_kv: the kernels take Hkv < Hq directly.
- No padding: dense routed attention, q and k of one length (training, prefill) or q shorter than k (decode
  and chunked prefill against a cache: queries are the last positions, causal bottom-right aligned).
- Padding (attention_mask with zeros, left or right): the valid tokens are packed into varlen sequences, so a
  padded row never changes the others; padded query rows give zeros. The mask function registered with the
  backend hands over the (B, kv_len) padding mask (or None) instead of a dense 4D mask.
- Generation with :class:`RoutedCache` (``model.generate(..., cache=RoutedCache(model.config))``):
  the cache keeps K/V as (B, capacity, Hkv, D) buffers plus the running chunk key sums of
  :class:`routing_kernels.RoutedKVCache`, and hands them to the attention function, so an unpadded decode step
  runs the decode path (gate over the chunk sums, attention over the selected chunks only).
- With transformers' own caches (DynamicCache, the default) it is still correct: every decode step rebuilds
  the chunk means from the cached keys, one read of the whole cache per layer and step (the traffic of dense
  decode), and padded batches always take the packed path.
- dropout > 0 is refused (routed attention has no dropout); ``output_attentions`` has no attention matrix.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..cache import RoutedKVCache
from ..functional import routed_attention
from ..ops.routed_attention import decode

NAME = "routed"
_INSTALL_HINT = "routing_kernels.integrations.transformers needs transformers >= 5: pip install 'transformers>=5'"


def register(name: str = NAME) -> None:
    """Register the backend as ``attn_implementation=name`` (attention function and its mask function)."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import flash_attention_mask
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error
    AttentionInterface.register(name, routed_attention_forward)
    # Without a mask function of its own the model passes attention_mask=None and padding is silently lost;
    # the flash-attention one gives a (B, kv_len) bool mask when there is padding, else None.
    AttentionMaskInterface.register(name, flash_attention_mask)


def routing_config(config) -> tuple[int, int, frozenset, Optional[str]]:
    """(chunk_size, top_k, dense_layers, backend) from ``config.routed_attention``, validated."""
    cfg = getattr(config, "routed_attention", None)
    if not isinstance(cfg, dict):
        raise ValueError("attn_implementation='routed' needs config.routed_attention = {'chunk_size': int, "
                         f"'top_k': int}} (optional 'dense_layers': [layer indices]), got {cfg!r}")
    unknown = set(cfg) - {"chunk_size", "top_k", "dense_layers", "backend"}
    if unknown:
        raise ValueError(f"config.routed_attention has unknown keys {sorted(unknown)}; known: chunk_size, top_k, "
                         f"dense_layers, backend")
    for key in ("chunk_size", "top_k"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"config.routed_attention['{key}'] must be an int >= 1, got {cfg.get(key)!r}")
    return cfg["chunk_size"], cfg["top_k"], frozenset(cfg.get("dense_layers", ())), cfg.get("backend")


def routed_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract: (B, H, N, D) in, ((B, Nq, Hq, Dv), None) out."""
    chunk_size, top_k, dense_layers, backend = routing_config(module.config)
    if getattr(module, "layer_idx", None) in dense_layers:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout:
        raise ValueError(f"routed attention has no attention dropout (got dropout={dropout}); set the model's "
                         "attention_dropout to 0")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, D) views
    cached = kwargs.get(_CACHE_KEY)
    if attention_mask is None and cached is not None and q.shape[1] <= decode.MAX_QUERIES:
        k_cache, v_cache, seqlens, key_sums = cached  # RoutedCache's buffers: the decode path
        # every row holds k.shape[1] keys: a cache within top_k chunks runs dense (see trim_to_bound)
        k_cache, v_cache, key_sums = decode.trim_to_bound(k_cache, v_cache, key_sums, k.shape[1], chunk_size, top_k,
                                                          backend)
        return routed_attention(q, k_cache, v_cache, chunk_size, top_k, causal=causal, seqused_k=seqlens,
                                key_sums=key_sums, scale=scaling, backend=backend), None
    if attention_mask is None:
        return routed_attention(q, k, v, chunk_size, top_k, causal=causal, scale=scaling, backend=backend), None
    return _padded(q, k, v, attention_mask, chunk_size, top_k, causal, scaling, backend), None


def _padded(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor, chunk_size: int, top_k: int, causal: bool,
            scale: Optional[float], backend: Optional[str]) -> Tensor:
    """Padded batch -> packed varlen sequences of the valid tokens -> back, zeros in padded query rows. The
    queries are the last q_len positions of the key rows, so their mask is the key mask's tail."""
    if attention_mask.dim() != 2:
        raise ValueError(f"the routed backend expects a (B, kv_len) padding mask from its mask function, got shape "
                         f"{tuple(attention_mask.shape)}: was the model's mask function replaced?")
    n_q, n_k = q.shape[1], k.shape[1]
    k_mask = attention_mask[:, -n_k:].bool()
    q_mask = k_mask[:, -n_q:]
    cu_k = torch.nn.functional.pad(k_mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.nn.functional.pad(q_mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    layouts = (dict(cu_seqlens=cu_q, max_seqlen=n_q) if n_q == n_k
               else dict(cu_seqlens_q=cu_q, max_seqlen_q=n_q, cu_seqlens_k=cu_k, max_seqlen_k=n_k))
    packed = routed_attention(q[q_mask], k[k_mask], v[k_mask], chunk_size, top_k, causal=causal, scale=scale,
                              backend=backend, **layouts)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    out[q_mask] = packed
    return out


# ---- a transformers Cache that keeps chunk key sums ----

_CACHE_KEY = "routed_cache"  # the entry RoutedCache adds to the attention kwargs


def _cache_classes():
    try:
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error
    return Cache, DynamicLayer


def RoutedCache(config, initial_capacity: int = 1024):  # noqa: N802 (a class factory: transformers is optional)
    """A transformers Cache for routed generation: ``model.generate(ids, cache=RoutedCache(config))``.

    Per layer a :class:`routing_kernels.RoutedKVCache` (K/V as (B, capacity, Hkv, D) and fp32 chunk key sums,
    grown by doubling from ``initial_capacity`` tokens); ``update`` appends in O(new tokens) (plus the copy when
    it grows) and passes the buffers to the routed attention function through the attention kwargs, so decode
    reads only the chunk sums and the selected chunks. Every row holds the same number of tokens (transformers'
    caches are rectangular); padded batches still work, through the packed path. Beam search, cropping and
    batch reordering are not supported (NotImplementedError): use DynamicCache for those.
    """
    cache_cls, _ = _cache_classes()
    return _routed_cache_class(cache_cls)(config, initial_capacity)


_CLASSES: dict = {}


def _routed_cache_class(cache_cls):
    if "cache" in _CLASSES:
        return _CLASSES["cache"]
    _, dynamic_layer = _cache_classes()

    class RoutedCacheLayer(dynamic_layer):
        def __init__(self, chunk_size: int, initial_capacity: int):
            super().__init__()
            self.chunk_size, self.initial_capacity, self.store = chunk_size, initial_capacity, None

        def lazy_initialization(self, key_states, value_states):
            self.device, self.dtype = key_states.device, key_states.dtype
            self.is_initialized = True

        def _grow(self, need: int, key_states, value_states):
            b, hkv, _, d = key_states.shape
            capacity = max(need, self.initial_capacity, 2 * (self.store.capacity if self.store else 0))
            store = RoutedKVCache(1, b, capacity, hkv, d, self.chunk_size, v_head_dim=value_states.shape[-1],
                                  dtype=key_states.dtype, device=key_states.device)
            if self.store is not None:
                n = self.get_seq_length()
                store.append(0, self.store.k[0, :, :n], self.store.v[0, :, :n])
            self.store = store

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length() + key_states.shape[-2]
            if self.store is None or n > self.store.capacity:
                self._grow(n, key_states, value_states)
            self.store.append(0, key_states.transpose(1, 2), value_states.transpose(1, 2))
            self.keys = self.store.k[0, :, :n].transpose(1, 2)  # (B, Hkv, n, D) views for transformers
            self.values = self.store.v[0, :, :n].transpose(1, 2)
            attention_kwargs = kwargs.get("kwargs")
            if isinstance(attention_kwargs, dict):  # the dict the model passes on to the attention function
                attention_kwargs[_CACHE_KEY] = (self.store.k[0], self.store.v[0], self.store.seqlens[0],
                                                self.store.key_sums[0])
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return 0 if self.keys is None else self.keys.shape[-2]

        def reset(self):
            self.store, self.keys, self.values, self.is_initialized = None, None, None, False

        def _unsupported(self, *args, **kwargs):
            raise NotImplementedError("RoutedCache does not support beam search, cropping or batch reordering yet; "
                                      "use transformers' DynamicCache for those (still routed, without chunk sums)")

        crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported

    class RoutedCacheImpl(cache_cls):
        def __init__(self, config, initial_capacity: int = 1024):
            chunk_size = routing_config(config)[0]
            super().__init__(layer_class_to_replicate=lambda: RoutedCacheLayer(chunk_size, initial_capacity))

    RoutedCacheImpl.__name__ = RoutedCacheImpl.__qualname__ = "RoutedCache"
    _CLASSES["cache"] = RoutedCacheImpl
    return RoutedCacheImpl
