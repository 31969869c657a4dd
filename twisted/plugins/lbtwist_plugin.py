"""twistd dropin: lazy, so a broken lbtwist import cannot hide the subcommand."""
from twisted.application.service import ServiceMaker

lbtwist = ServiceMaker(
    "lbtwist", "lbtwist.tap", "Multi-protocol load balancer (L4/L7).", "lbtwist"
)
