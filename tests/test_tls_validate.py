"""TLS config keys through the real loader and validator: every bad
certificate or key is one clear error naming the file, on its YAML line."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap

import pytest

from lbtwist.config import ConfigError, load_config
from lbtwist.config.model import ListenerTLSConfig, PoolTLSConfig, TLSPassthroughConfig
from lbtwist.registry import Registry
from lbtwist.tls.files import TLSFileError, load_certificate_pair
from lbtwist.tls.testing import TestCA

REG = Registry.default()


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture
def d(ca, tmp_path):
    """Certificate files: good ones and one of each kind of broken."""
    now = datetime.datetime.now(datetime.timezone.utc)
    good = ca.issue("a.test", "*.a.test")
    good.write(tmp_path, "good")
    ca.issue("b.test").write(tmp_path, "b")
    ca.issue("old.test", not_before=now - datetime.timedelta(days=9),
             not_after=now - datetime.timedelta(days=2)).write(tmp_path, "expired")
    ca.issue("soon.test", not_after=now + datetime.timedelta(days=3)).write(tmp_path, "soon")
    (tmp_path / "combined.pem").write_bytes(good.cert_pem + good.key_pem)
    (tmp_path / "other.key").write_bytes(ca.issue("x.test").key_pem)
    (tmp_path / "garbage.pem").write_bytes(b"hello\n")
    (tmp_path / "enc.key").write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n")
    ca.write_ca(tmp_path / "ca.pem")
    ca.issue("client", client=True).write(tmp_path, "client")
    return tmp_path


def problems(text: str) -> list:
    try:
        return load_config(textwrap.dedent(text), REG, source_name="t.yaml").warnings
    except ConfigError as e:
        return e.problems


def listener(d, tls: str, mode: str = "http") -> str:
    """A config with one listener whose extra keys are ``tls`` (YAML, any indentation)."""
    head = textwrap.dedent(f"""\
        listeners:
          - name: edge
            bind: "tcp:0:interface=127.0.0.1"
            mode: {mode}
            pool: app
        """)
    tail = textwrap.dedent("""\
        pools:
          - name: app
            backends: [{address: "127.0.0.1:9001"}]
        """)
    return head + textwrap.indent(textwrap.dedent(tls).strip() + "\n", "    ") + tail


def only(ps, severity="error"):
    return [str(p) for p in ps if p.severity == severity]


def test_issue_example_config_loads(d):
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      min_version: "1.2"
      session_tickets: {{rotate: 12h, keep: 2}}
      session_cache: {{size: 20000, timeout: 5m}}
    """)
    loaded = load_config(textwrap.dedent(text), REG, source_name="t.yaml")
    tls = loaded.config.listeners[0].tls
    assert isinstance(tls, ListenerTLSConfig)
    assert tls.session_tickets.rotate == 12 * 3600 and tls.session_cache.timeout == 300
    assert tls.certificates[0].key.endswith("good.key") and loaded.warnings == []


@pytest.mark.parametrize(
    "cert,key,where,message",
    [
        ("missing.pem", "good.key", "certificates[0].cert", "missing.pem: certificate file not found"),
        ("garbage.pem", "good.key", "certificates[0].cert", "garbage.pem: no PEM certificate in file"),
        ("expired.pem", "expired.key", "certificates[0].cert", "expired.pem: certificate 'old.test' expired on"),
        ("good.pem", "other.key", "certificates[0].key", "other.key: private key does not match certificate"),
        ("good.pem", "enc.key", "certificates[0].key", "enc.key: private key is encrypted"),
        ("good.pem", "missing.key", "certificates[0].key", "missing.key: key file not found"),
        ("good.pem", "b.pem", "certificates[0].key", "b.pem: no PEM private key in file"),
        (".", "good.key", "certificates[0].cert", ": certificate file is a directory"),
    ],
)
def test_bad_certificate_or_key_is_an_error_naming_the_file(d, cert, key, where, message):
    text = listener(d, f"""
    tls:
      certificates: [{{cert: "{d}/{cert}", key: "{d}/{key}"}}]
    """)
    errs = only(problems(text))
    assert len(errs) == 1, errs
    assert f"listeners[0].tls.{where}: " in errs[0] and message in errs[0]
    assert errs[0].startswith("t.yaml:7: ")  # the line of the certificates entry


def test_unreadable_file_is_named(d):
    """The key is readable by its owner only; load it as another user (root reads anything)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)
        cert, key = shutil.copy(d / "b.pem", tmp), shutil.copy(d / "b.key", tmp)
        os.chmod(cert, 0o644)
        os.chmod(key, 0o600)
        if os.geteuid() != 0:
            with pytest.raises(TLSFileError, match="b.key: key file is not readable"):
                load_certificate_pair(cert, key, 0.0)
            return
        code = (
            "import os, time\n"
            "from lbtwist.tls.files import load_certificate_pair, TLSFileError\n"
            "os.setgid(65534); os.setuid(65534)  # after the imports: the interpreter lives under /root\n"
            f"try:\n  load_certificate_pair({cert!r}, {key!r}, time.time())\n"
            "except TLSFileError as e:\n  print(e)\n"
        )
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env, cwd="/")
    assert f"{key}: key file is not readable (permission denied)" in out.stdout, out.stdout + out.stderr


def test_combined_pem_and_expiry_warning(d):
    text = listener(d, f"""
    tls:
      certificates:
        - {{cert: {d}/combined.pem}}
        - {{cert: {d}/soon.pem, key: {d}/soon.key}}
    """)
    ps = problems(text)
    assert only(ps) == []
    warns = only(ps, "warning")
    assert len(warns) == 1 and "soon.pem: certificate expires soon" in warns[0]


def test_names_defaults_versions_and_alpn(d):
    text = listener(d, f"""
    tls:
      certificates:
        - {{cert: {d}/good.pem, key: {d}/good.key, default: true, names: [a.test, "bad*.test", other.test]}}
        - {{cert: {d}/b.pem, key: {d}/b.key, default: true, names: [a.test]}}
      min_version: "1.1"
      ciphers: "NOPE-CIPHER"
      ciphersuites: "TLS_NOPE"
      alpn: [spdy/3.1, h2, http/1.1]
      session_cache: {{size: 50000}}
      session_tickets: {{keep: 0}}
    """)
    ps = problems(text)
    errs = "\n".join(only(ps))
    assert "certificates[0].names[1]: 'bad*.test': a wildcard must be the whole leftmost label" in errs
    assert "certificates[1].names[0]: server name 'a.test' is already served by certificates[0]" in errs
    assert "certificates[1].default: only one certificate can be the default" in errs
    assert "tls.min_version: TLS version '1.1': expected one of '1.2', '1.3'" in errs
    assert "tls.ciphers: unknown cipher 'NOPE-CIPHER'" in errs
    assert "tls.ciphersuites: unknown TLS 1.3 suite 'TLS_NOPE'" in errs
    assert "tls.alpn[0]: an http listener speaks only h2, http/1.1; 'spdy/3.1'" in errs
    assert "tls.alpn[1]" not in errs  # h2 is spoken now
    assert "session_cache.size: above OpenSSL's fixed cache limit of 20480" in errs
    assert "session_tickets.keep: must be at least 1" in errs
    warns = "\n".join(only(ps, "warning"))
    assert "names[2]: 'other.test' is not among the certificate's names" in warns


def test_an_unknown_suite_among_known_ones_is_an_error_naming_it_on_its_line(d):
    """OpenSSL itself skips an unknown name when another one matches; the
    check (and the listener, through the same parser) must not."""
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      ciphers: "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES256-GCM-SHA999"
      ciphersuites: "TLS_AES_256_GCM_SHA384:TLS_AES_512_GCM_SHA999"
      groups: "X25519:P-999"
      session_tickets: {{lifetime: 200h}}
    """)
    errs = only(problems(text))
    assert len(errs) == 4, errs
    line = {k: i + 1 for i, l in enumerate(text.splitlines()) for k in ("ciphers:", "ciphersuites:", "groups:")
            if l.strip().startswith(k)}
    by_key = {k: [e for e in errs if f"tls.{k[:-1]}:" in e] for k in line}
    for k, n in line.items():
        assert len(by_key[k]) == 1 and f":{n}:" in by_key[k][0], (k, n, by_key[k])
    assert "unknown cipher 'ECDHE-ECDSA-AES256-GCM-SHA999'" in by_key["ciphers:"][0]
    assert "unknown TLS 1.3 suite 'TLS_AES_512_GCM_SHA999'" in by_key["ciphersuites:"][0]
    assert "unknown group 'P-999'" in by_key["groups:"][0]
    assert any("session_tickets.lifetime: 720000s is above the 7 days" in e for e in errs)


def test_cipher_list_syntax_accepted(d):
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      ciphers: "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:-SHA1:@STRENGTH"
      ciphersuites: "TLS_CHACHA20_POLY1305_SHA256"
      groups: "P-256:X448"
    """)
    assert only(problems(text)) == []


def test_tls13_name_in_the_tls12_list_is_pointed_to_ciphersuites(d):
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      ciphers: "ECDHE-ECDSA-AES256-GCM-SHA384:TLS_AES_256_GCM_SHA384"
    """)
    assert any("'TLS_AES_256_GCM_SHA384' is a TLS 1.3 suite: list it under ciphersuites" in e for e in only(problems(text)))


def test_unquoted_version_gets_a_hint(d):
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      min_version: 1.2
    """)
    assert any('quote it: "1.2"' in e for e in only(problems(text)))


def test_rotation_shorter_than_session_lifetime_warns(d):
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      session_tickets: {{rotate: 1m, keep: 2}}
      session_cache: {{timeout: 10m}}
    """)
    warns = only(problems(text), "warning")
    assert len(warns) == 1 and "session_tickets.rotate: a ticket's key is dropped 60s" in warns[0]


def test_tls_on_udp_and_with_passthrough(d):
    ps = problems(listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
    """, mode="udp"))
    assert any("listeners[0].tls: tls needs mode: http or tcp (this listener is udp)" in e for e in only(ps))
    ps = problems(listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
    tls_passthrough: {{routes: {{a.test: app}}}}
    """, mode="tcp"))
    assert any("tls and tls_passthrough exclude each other" in e for e in only(ps))


def test_passthrough_routes_checked(d):
    text = f"""
    listeners:
      - name: sni
        bind: "tcp:0:interface=127.0.0.1"
        mode: tcp
        tls_passthrough:
          routes: {{a.test: app, "*.b.test": ap, "x*.test": app}}
    pools:
      - name: app
        backends: [{{address: "127.0.0.1:9001"}}]
    """
    ps = problems(text)
    errs = "\n".join(only(ps))
    assert "tls_passthrough.routes['*.b.test']: unknown pool 'ap'" in errs
    assert "tls_passthrough.routes['x*.test']: 'x*.test': a wildcard must be" in errs
    assert "needs a pool" not in errs  # passthrough routes stand in for the pool
    assert any("no default pool: connections without SNI" in w for w in only(ps, "warning"))
    loaded = load_config(textwrap.dedent(text.replace('"*.b.test": ap, "x*.test": app', '"*.b.test": app')),
                         REG, source_name="t.yaml")
    tp = loaded.config.listeners[0].tls_passthrough
    assert isinstance(tp, TLSPassthroughConfig) and tp.routes == {"a.test": "app", "*.b.test": "app"}
    # http listeners cannot pass TLS through
    ps = problems(text.replace("mode: tcp", "mode: http\n        pool: app"))
    assert any("tls_passthrough needs mode: tcp" in e for e in only(ps))


def test_pool_tls_checked(d):
    base = f"""
    listeners:
      - {{name: edge, bind: "tcp:0:interface=127.0.0.1", mode: http, pool: app}}
    pools:
      - name: app
        backends: [{{address: "127.0.0.1:9001"}}]
        tls: TLS
    """
    ok = load_config(textwrap.dedent(base.replace(
        "TLS", f"{{ca: {d}/ca.pem, server_name: app.internal, cert: {d}/client.pem, key: {d}/client.key}}")),
        REG, source_name="t.yaml")
    assert isinstance(ok.config.pools[0].tls, PoolTLSConfig)
    errs = "\n".join(only(problems(base.replace(
        "TLS", f'{{ca: {d}/nope.pem, cert: {d}/client.pem, key: {d}/other.key, server_name: "*.x", min_version: "1.0"}}'))))
    assert "pools[0].tls.ca: " in errs and "nope.pem: CA bundle file not found" in errs
    assert "pools[0].tls.key: " in errs and "other.key: private key does not match" in errs
    assert "pools[0].tls.server_name: '*.x': a backend name cannot be a wildcard" in errs
    assert "pools[0].tls.min_version: " in errs
    errs = only(problems(base.replace("TLS", f"{{key: {d}/client.key}}")))
    assert any("pools[0].tls.key: a client key needs its certificate" in e for e in errs)


def test_hsts_checks(d):
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      hsts: {{max_age: 1h, preload: true}}
    """)
    errs = "\n".join(only(problems(text)))
    assert "tls.hsts.preload: preload lists require include_subdomains: true" in errs
    assert "tls.hsts.preload: preload lists require max_age of at least one year" in errs
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      hsts: {{max_age: 1h}}
    """, mode="tcp")
    assert any("tls.hsts: HSTS is an HTTP header: it needs mode: http" in e for e in only(problems(text)))
    text = listener(d, f"""
    tls:
      certificates: [{{cert: {d}/good.pem, key: {d}/good.key}}]
      hsts: {{max_age: 8760h, include_subdomains: true, preload: true}}
    """)
    assert only(problems(text)) == []
