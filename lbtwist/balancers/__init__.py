"""Balancing algorithms, one module per family. They are sans-IO objects that
implement L{lbtwist.interfaces.IBalancer}; L{lbtwist.balancers.builtin}
registers them with the plugin registry under their config names:

  round_robin, random, weighted_round_robin, least_connections,
  peak_ewma, p2c (the default), ring_hash, maglev

All randomness comes from the ``rng`` handed to the factory, all time from
``ctx.now`` and the ``now`` of start/finish events, so tests are exact.
"""
DEFAULT_ALGORITHM = "p2c"
