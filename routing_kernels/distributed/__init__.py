"""Context parallelism for routed attention: sequences split over the ranks of a torch.distributed group.

:func:`context_parallel_routed_attention` computes, on each rank, the routed attention of its shard's queries
exactly as one process would on the full sequences, moving only chunk sums and the K/V chunks some query
selected (never all of K/V). :func:`shard` / :func:`unshard` build and reassemble shards, :func:`make_plan`
describes the split, :func:`count_bytes` records what a rank sends. See README.md for the accounting.
"""
from .attention import context_parallel_routed_attention
from .comm import CommLog, count_bytes
from .sharding import LAYOUTS, ShardPlan, make_plan, shard, unshard

__all__ = ["CommLog", "LAYOUTS", "ShardPlan", "context_parallel_routed_attention", "count_bytes", "make_plan",
           "shard", "unshard"]
