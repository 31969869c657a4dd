"""twistd dropin: lazy, so a broken lbtwist import cannot hide the subcommand.

``lbtwist`` is the service (``twistd lbtwist --config FILE``); ``lbtwist-lean``
is an epoll reactor with leaner event dispatch (``twistd --reactor=lbtwist-lean``).
"""
from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

lbtwist = ServiceMaker(
    "lbtwist", "lbtwist.tap", "Multi-protocol load balancer (L4/L7).", "lbtwist"
)
lbtwist_lean = Reactor(
    "lbtwist-lean", "lbtwist.fastio", "epoll reactor with lean event dispatch (lbtwist)"
)
