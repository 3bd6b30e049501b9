"""`spill.mode: predict` — forward when a peer's predicted TTFT beats ours by a margin.

The `skylb` policy's prediction (policy/common.py `predicted_ttft`), extended by the network:

    local  = the best healthy local replica's predicted TTFT (`Router.best_local`)
    peer p = 2 x one-way RTT(p) + queue(p) + p.wait_s + sent(p)
             + prefill(prompt - what our index holds for p) at p's speed

- `queue(p)`: the requests p holds at its balancer drain at its dispatch rate first (a forwarded
  request is routed there like a local one, behind them; `max_wait_s` when nothing drains);
- `p.wait_s`: the shortest queue before a prefill starts on one of p's healthy replicas, from its
  last summary; `sent(p)`: the prefill seconds we forwarded to p since the poll behind that
  summary began, spread over its healthy replicas (one summary must not draw a burst there);
- a request (with what we sent since) larger than the most KV p has free on one replica waits
  for a finish there: + that replica's seconds between finishes;
- our index for p holds the prompts we forwarded there (cross-region prefix sharing is low, so
  our own history is the signal, as in SkyLB): the next turn of a conversation served there
  finds its prefix there, and follows it unless home has become cheaper;
- p's speed: its reported mean prefill speed, else ours (older publishers report none).

Candidates are the fresh peers with a healthy replica; the cheapest goes (ties: RTT, then peer
order) when it beats local by more than `margin_s`, so noise does not send a request on a round
trip for nothing. Asked at arrival and again for held requests on every event, so a request
leaves as soon as a peer is the better bet, and a conversation that left stays where its cache
is. The RTT counted is the round trip: the request goes there and its first token comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from skylb_extproc.policy.common import prefill_time
from skylb_extproc.region.cost import wait_estimate
from skylb_extproc.region.spill import Forward, RegionView, rescue_candidates

__all__ = ["RELATIVE_MARGIN", "choose_by_prediction"]

# A peer must also beat local by this share of local's prediction: both are estimates, and a
# request sent away on a near tie pays a sure round trip for an unsure gain.
RELATIVE_MARGIN = 0.2


def choose_by_prediction(
    peers: Sequence[RegionView],
    *,
    local_s: float | None,
    matched: Mapping[str, int],
    prompt_chars: int,
    block_chars: int,
    kv_tokens: float,
    sent: Mapping[str, tuple[float, float]],
    margin_s: float,
    tokens_per_s: float,
    max_wait_s: float,
    our_queue: int,
) -> Forward | None:
    """The peer to forward to, or None to keep the request (`local_s` None: no local replica)."""
    best: tuple[float, float, int, RegionView, float] | None = None
    for order, peer in enumerate(rescue_candidates(peers)):
        if peer.queue_length > our_queue:
            continue  # never push work to a region holding more than we do (SkyLB's code)
        held = matched.get(peer.name, 0) * block_chars
        prefill = prefill_time(prompt_chars, held, peer.prefill_tokens_per_s or tokens_per_s)
        sent_s, sent_tokens = sent.get(peer.name, (0.0, 0.0))
        cost = 2 * peer.rtt_s + peer.wait_s + sent_s + prefill
        cost += wait_estimate(peer.queue_length, peer.dispatch_rate, max_wait_s)
        if peer.kv_free_tokens is not None and kv_tokens + sent_tokens > peer.kv_free_tokens:
            cost += peer.finish_interval_s
        key = (cost, peer.rtt_s, order, peer, prefill)
        if best is None or key[:3] < best[:3]:
            best = key
    if best is None:
        return None
    cost, _, _, peer, prefill = best
    if local_s is not None and cost + margin_s + RELATIVE_MARGIN * local_s >= local_s:
        return None
    return Forward(peer.name, "predict", matched.get(peer.name, 0), prefill, kv_tokens)
