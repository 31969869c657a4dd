"""The hook implementations lbtwist calls, found through the ``lbtwist``
entry point ``example = lbtwist_example.plugin``.

A plugin only returns specs; lbtwist calls the factories once at config load
and keeps the objects they make, so nothing here runs per request except
``pick`` and ``matches``.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl, urlsplit

from zope.interface import implementer

from lbtwist import hookimpl
from lbtwist.interfaces import IBalancer, IRouteMatcher
from lbtwist.registry import BalancerSpec, RuleSpec

# -- algorithm: ordered_failover ----------------------------------------------


@implementer(IBalancer)
class OrderedFailover:
    """All work to the first usable backend in config order.

    The pool passes candidates in config order, already filtered to usable
    ones (healthy, not draining, not ejected), so "first eligible" is the
    primary while it is up and the next standby otherwise. A backend tried
    already for this work (``ctx.exclude``) or weighted 0 is passed over.
    """

    def pick(self, candidates: Sequence[Any], ctx: Any) -> Any:
        exclude = ctx.exclude
        for b in candidates:
            if b.weight > 0 and not (exclude and b in exclude):
                return b
        return None

    def on_start(self, backend: Any, now: float) -> None:
        pass

    def on_finish(self, backend: Any, now: float, latency: float, ok: bool) -> None:
        pass


def make_ordered_failover(options: dict[str, Any], *, clock: Any = None, rng: Any = None) -> OrderedFailover:
    if options:
        name = next(iter(options))
        raise ValueError(f"ordered_failover: unknown option {name!r}; ordered_failover takes no options")
    return OrderedFailover()


@hookimpl
def lbtwist_balancers() -> Iterable[BalancerSpec]:
    return [
        BalancerSpec(
            "ordered_failover",
            make_ordered_failover,
            "first usable backend in config order (active/passive failover)",
        )
    ]


# -- route match: query_param --------------------------------------------------


@implementer(IRouteMatcher)
class QueryParamMatcher:
    """Holds when the query string has every ``name=value`` pair required."""

    def __init__(self, required: dict[str, str]) -> None:
        self.required = required

    def matches(self, request: Any) -> bool:
        query = urlsplit(request.target).query
        if not query:
            return False
        found: dict[str, set[str]] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in self.required:
                found.setdefault(name, set()).add(value)
        return all(v in found.get(k, ()) for k, v in self.required.items())

    def __repr__(self) -> str:
        return f"<query_param {self.required!r}>"


def make_query_param(value: Any) -> QueryParamMatcher:
    """``{name: value, ...}``; values may be strings or numbers (YAML ``page: 2``)."""
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f"query_param must be a mapping of parameter name to value, e.g. {{beta: '1'}}, not {value!r}"
        )
    required: dict[str, str] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"query_param: parameter names must be non-empty strings, not {name!r}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"query_param: value of {name!r} must be a string or a number, not {v!r}")
        required[name] = str(v)
    return QueryParamMatcher(required)


@hookimpl
def lbtwist_routing_rules() -> Iterable[RuleSpec]:
    return [RuleSpec("query_param", make_query_param, "query string has name=value (every pair listed)")]


# -- health probe kinds --------------------------------------------------------
# (An ``lbtwist_health_probes`` hook implementation goes here.)
