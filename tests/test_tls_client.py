"""TLS to backends on the real reactor (127.0.0.1): verification with
service-identity, CA bundle, mTLS client certificates, per-backend session
reuse, and the TLS health probe."""
from __future__ import annotations

import types

import pytest
import pytest_twisted
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet import defer, reactor, ssl as tssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from lbtwist.config.model import CertificateConfig, ListenerTLSConfig, PoolTLSConfig
from lbtwist.tls.client import (
    BackendTLS,
    BackendVerificationError,
    client_connection_creator,
    connect_tls,
    is_verification_failure,
    probe_tls,
)
from lbtwist.tls.context import ServerTLS, TLSConfigError
from lbtwist.tls.server import wrap_server_factory
from lbtwist.tls.testing import TestCA

pytestmark = pytest.mark.integration
WAIT = 10.0


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(Protocol):
    """Client side: sends on connect, collects the echo, reports the end."""

    def __init__(self):
        self.got = b""
        self.done = defer.Deferred()
        self.echoed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"hello")

    def dataReceived(self, data):
        self.got += data
        if self.got == b"hello" and not self.echoed.called:
            self.echoed.callback(self)

    def connectionLost(self, reason):
        self.reason = reason
        if not self.echoed.called:
            self.echoed.errback(reason)
            self.echoed.addErrback(lambda f: None)
        self.done.callback(reason.value)


@pytest.fixture(scope="module")
def ca():
    return TestCA("backend CA")


@pytest.fixture
def files(ca, tmp_path):
    return types.SimpleNamespace(
        backend=ca.issue("backend.test").write(tmp_path, "backend"),
        ca=ca.write_ca(tmp_path / "ca.pem"),
        other_ca=TestCA("other CA").write_ca(tmp_path / "other-ca.pem"),
        client=ca.issue("lbtwist-client", client=True).write(tmp_path, "client"),
        dir=tmp_path,
    )


@pytest_twisted.async_yield_fixture
async def backend(files):
    st = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=files.backend[0], key=files.backend[1])]),
                   task.Clock(), name="backend")
    port = reactor.listenTCP(0, wrap_server_factory(Factory.forProtocol(Echo), st, reactor), interface="127.0.0.1")
    yield types.SimpleNamespace(port=port.getHost().port, state=st)
    await port.stopListening()


async def exchange(creator, port):
    proto = Collect()
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await connect_tls(ep, creator, Factory.forProtocol(lambda: proto), reactor).addTimeout(WAIT, reactor)
    try:
        await proto.echoed.addTimeout(WAIT, reactor)
    finally:
        proto.transport.loseConnection()
        await proto.done.addTimeout(WAIT, reactor)
    return proto


@pytest.mark.parametrize("max_version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
@pytest_twisted.ensureDeferred
async def test_verified_connection_and_session_reuse(backend, files, max_version):
    pool = BackendTLS(PoolTLSConfig(ca=files.ca, server_name="backend.test"))
    pool.context.set_max_proto_version(max_version)
    creator = pool.creator_for("127.0.0.1", key="127.0.0.1:1")
    for _ in range(3):
        p = await exchange(creator, backend.port)
        assert p.got == b"hello"
    assert creator.stats.handshakes == 3 and creator.stats.resumed == 2
    assert creator.stats.verify_failures == 0
    assert backend.state.stats.resumed_handshakes == 2
    # another backend of the same pool has its own session
    other = pool.creator_for("127.0.0.1", key="127.0.0.1:2")
    await exchange(other, backend.port)
    assert other.stats.resumed == 0 and other is not creator


@pytest_twisted.ensureDeferred
async def test_session_survives_backend_closing_without_close_notify(backend, files):
    pool = BackendTLS(PoolTLSConfig(ca=files.ca, server_name="backend.test"))
    creator = pool.creator_for("127.0.0.1")
    proto = Collect()
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", backend.port, timeout=5)
    await connect_tls(ep, creator, Factory.forProtocol(lambda: proto), reactor).addTimeout(WAIT, reactor)
    await proto.echoed.addTimeout(WAIT, reactor)
    proto.transport.transport.abortConnection()  # TCP reset under TLS: no close_notify sent
    await proto.done.addTimeout(WAIT, reactor)
    await exchange(creator, backend.port)
    assert creator.stats.resumed == 1


@pytest.mark.parametrize(
    "cfg,why",
    [
        (dict(server_name="other.test"), "does not match 'other.test'"),
        (dict(server_name="backend.test", use_other_ca=True), "unable to get local issuer certificate"),
        (dict(server_name="127.0.0.1"), "does not match '127.0.0.1'"),
    ],
    ids=["wrong-name", "untrusted-ca", "ip-not-in-cert"],
)
@pytest_twisted.ensureDeferred
async def test_verification_failure_is_an_error_counted_on_the_backend(backend, files, cfg, why):
    ca = files.other_ca if cfg.pop("use_other_ca", False) else files.ca
    pool = BackendTLS(PoolTLSConfig(ca=ca, **cfg))
    creator = pool.creator_for("127.0.0.1")
    proto = Collect()
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", backend.port, timeout=5)
    await connect_tls(ep, creator, Factory.forProtocol(lambda: proto), reactor).addTimeout(WAIT, reactor)
    await proto.done.addTimeout(WAIT, reactor)
    reason = proto.reason
    assert is_verification_failure(reason), reason
    assert isinstance(reason.value, BackendVerificationError) and why in str(reason.value)
    assert proto.got == b""  # nothing was ever sent or received in clear
    assert creator.stats.verify_failures == 1 and why in creator.stats.last_verify_error
    assert creator.stats.handshakes == 0 and creator.session is None


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # Twisted's server options
@pytest_twisted.ensureDeferred
async def test_mtls_client_certificate_is_presented(files, ca):
    seen = []

    class Peer(Protocol):
        def dataReceived(self, data):
            seen.append(self.transport.getPeerCertificate())
            self.transport.write(data)

    leaf = ca.issue("backend.test")
    opts = tssl.CertificateOptions(
        privateKey=PKey.from_cryptography_key(leaf.key), certificate=X509.from_cryptography(leaf.cert),
        verify=True, caCerts=[X509.from_cryptography(ca.cert)], requireCertificate=True,
    )
    port = reactor.listenSSL(0, Factory.forProtocol(Peer), opts, interface="127.0.0.1")
    try:
        pool = BackendTLS(PoolTLSConfig(ca=files.ca, server_name="backend.test",
                                        cert=files.client[0], key=files.client[1]))
        p = await exchange(pool.creator_for("127.0.0.1"), port.getHost().port)
        assert p.got == b"hello"
        assert seen[0].to_cryptography().subject.rfc4514_string() == "CN=lbtwist-client"
        # without a client certificate the backend refuses the handshake
        plain = client_connection_creator(PoolTLSConfig(ca=files.ca, server_name="backend.test"), "127.0.0.1")
        with pytest.raises(Exception):
            await exchange(plain, port.getHost().port)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_probe(backend, files):
    good = BackendTLS(PoolTLSConfig(ca=files.ca, server_name="backend.test")).creator_for("127.0.0.1")
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", backend.port, timeout=5)
    assert await probe_tls(ep, good, reactor, WAIT) is None
    bad = BackendTLS(PoolTLSConfig(ca=files.other_ca, server_name="backend.test")).creator_for("127.0.0.1")
    with pytest.raises(BackendVerificationError):
        await probe_tls(ep, bad, reactor, WAIT)


def test_config_errors_name_the_file(files, tmp_path):
    with pytest.raises(TLSConfigError, match="nope.pem: CA bundle file not found"):
        BackendTLS(PoolTLSConfig(ca=str(tmp_path / "nope.pem")))
    with pytest.raises(TLSConfigError, match="client.key: private key does not match"):
        BackendTLS(PoolTLSConfig(cert=files.backend[0], key=files.client[1]))
    with pytest.raises(TLSConfigError, match="needs its certificate"):
        BackendTLS(PoolTLSConfig(key=files.client[1]))
