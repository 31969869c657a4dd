"""TLS for lbtwist: termination with SNI and resumption, ticket-key rotation,
certificate reload, TLS to backends, and SNI passthrough.

Public names are re-exported here; each concern lives in its own module.
"""
