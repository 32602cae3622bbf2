"""Token checks and credential files, without a cluster."""

from __future__ import annotations

import grpc
import pytest

from specserve.actors.errors import status_for
from specserve.actors.security import AuthError, SecurityError, TlsFiles, TokenAuth
from specserve.cluster.config import parse_config


@pytest.fixture
def auth(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\nalpha-1\n\n  beta-2  \n")
    return TokenAuth(str(f))


@pytest.mark.parametrize("value", ["Bearer alpha-1", "bearer beta-2", "Bearer  beta-2 "])
def test_each_listed_token_is_accepted(auth, value):
    auth.check([("authorization", value)])


@pytest.mark.parametrize("metadata", [None, [], [("x-other", "Bearer alpha-1")], [("authorization", "alpha-1")],
                                      [("authorization", "Bearer alpha")], [("authorization", "Bearer # comment")],
                                      [("authorization", "Bearer ")]])
def test_anything_else_is_refused_as_unauthenticated(auth, metadata):
    with pytest.raises(AuthError) as err:
        auth.check(metadata)
    assert status_for(err.value)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "alpha-1" not in str(err.value) and "beta-2" not in str(err.value)


def test_the_token_holder_never_shows_its_tokens(auth):
    assert "alpha" not in repr(auth) and "beta" not in repr(auth)


def test_missing_or_empty_token_files_are_errors_naming_the_field(tmp_path):
    with pytest.raises(SecurityError, match="security.auth_token_file: cannot read"):
        TokenAuth(str(tmp_path / "absent"))
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(SecurityError, match="holds no token"):
        TokenAuth(str(tmp_path / "empty"))


def test_unreadable_certificates_are_errors_naming_the_field(tmp_path):
    with pytest.raises(SecurityError, match=r"security.tls.cert_file: cannot read"):
        TlsFiles(str(tmp_path / "no.crt"), str(tmp_path / "no.key")).server_credentials("security.tls")
    (tmp_path / "c").write_text("certificate")
    with pytest.raises(SecurityError, match="needs both cert_file and key_file"):
        TlsFiles(cert_file=str(tmp_path / "c"), ca_file=None).channel_credentials("tls")


def test_with_tls_the_serve_grpc_proxy_is_left_off():
    plain = parse_config({}).to_serve_config()
    assert plain["grpc_options"]["grpc_servicer_functions"]
    tls = parse_config({"security": {"tls": {"cert_file": "s.crt", "key_file": "s.key"}}}).to_serve_config()
    assert tls["grpc_options"]["grpc_servicer_functions"] == []
    assert "s.crt" in str(tls["applications"][0]["args"])  # paths travel, not contents
