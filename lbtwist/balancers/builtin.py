"""The built-in algorithms, contributed through the same hook as third-party
plugins (registered by L{lbtwist.registry.Registry.default})."""
from __future__ import annotations

from lbtwist import hookimpl
from lbtwist.balancers.ewma import make_peak_ewma
from lbtwist.balancers.hashing import make_maglev, make_ring_hash
from lbtwist.balancers.least_conn import make_least_connections
from lbtwist.balancers.p2c import make_p2c
from lbtwist.balancers.random_choice import make_random
from lbtwist.balancers.round_robin import make_round_robin
from lbtwist.balancers.weighted import make_weighted_round_robin
from lbtwist.registry import BalancerSpec


@hookimpl
def lbtwist_balancers() -> list[BalancerSpec]:
    return [
        BalancerSpec("round_robin", make_round_robin, "each backend in turn; ignores weights and load"),
        BalancerSpec("weighted_round_robin", make_weighted_round_robin,
                     "smooth weighted round robin: shares follow weights without bursts"),
        BalancerSpec("random", make_random, "uniformly random backend"),
        BalancerSpec("least_connections", make_least_connections,
                     "fewest outstanding requests/connections per unit of weight"),
        BalancerSpec("peak_ewma", make_peak_ewma,
                     "lowest peak-EWMA latency times outstanding work; options: decay, penalty, failure_penalty"),
        BalancerSpec("p2c", make_p2c,
                     "less loaded of two random backends; options: load (peak_ewma|connections), decay, "
                     "penalty, failure_penalty. The default algorithm."),
        BalancerSpec("ring_hash", make_ring_hash,
                     "consistent hashing on a ring of virtual nodes; options: vnodes"),
        BalancerSpec("maglev", make_maglev, "Maglev consistent-hash lookup table; options: table_size"),
    ]
