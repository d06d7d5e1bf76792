"""SSRF filtering of every URL the appliance fetches (appliance.sources.urlfilter)."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.sources.urlfilter import HostUnresolvable, UrlNotAllowed, UrlPolicy, address_problem


def fake_dns(table: dict[str, list[str]]):
    """A resolver answering from ``table`` (names missing from it do not resolve); records lookups."""
    calls: list[str] = []

    def resolve(host: str, port: int) -> Iterable[str]:
        calls.append(host)
        if host not in table:
            raise OSError(-2, "Name or service not known")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.fixture
def policy() -> UrlPolicy:
    return UrlPolicy(resolver=fake_dns({}))


ENCODED_LOOPBACK = [
    "http://2130706433/",  # decimal
    "http://127.1/",  # short form
    "http://127.0.1/",
    "http://0x7f000001/",  # hex
    "http://0x7f.0.0.1/",  # hex octet
    "http://0X7F.0X0.0X0.0X1/",
    "http://0177.0.0.1/",  # octal
    "http://017700000001/",
    "http://127.000.000.001/",  # leading zeros
    "http://0/",
    "http://1.2.3.4.5/",
    "http://%31%32%37.0.0.1/",  # percent-encoded
]


@pytest.mark.parametrize("url", ENCODED_LOOPBACK)
def test_rejects_encoded_ip_forms(policy: UrlPolicy, url: str) -> None:
    with pytest.raises(UrlNotAllowed) as err:
        policy.check(url)
    assert err.value.code == "UrlNotAllowed"
    # refused by syntax: never handed to a resolver that might read it as 127.0.0.1
    assert policy.resolver.calls == []  # type: ignore[attr-defined]


DENIED_ADDRESSES = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.9.9.9/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://169.254.0.1/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://172.31.255.255/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.2.10/", "documentation"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fd00::1]/", "private"),
    ("http://[fc00::abcd]/", "private"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[fec0::1]/", "site-local"),
    ("http://[2001:db8::1]/", "documentation"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[0:0:0:0:0:ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of the metadata address
    ("http://[::127.0.0.1]/", "IPv4-compatible"),
    ("http://[2002:7f00:1::]/", "6to4"),
]


@pytest.mark.parametrize(("url", "why"), DENIED_ADDRESSES)
def test_rejects_non_public_addresses(policy: UrlPolicy, url: str, why: str) -> None:
    with pytest.raises(UrlNotAllowed) as err:
        policy.check(url)
    assert why in err.value.message
    assert "sources.allowed_endpoints" in err.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/",
        "https://8.8.8.8/path?X-Amz-Signature=abc&x=1",
        "http://[2606:4700:4700::1111]/",
        "http://[::ffff:8.8.8.8]/",
        "https://1.1.1.1:443/",
    ],
)
def test_accepts_public_literals_on_allowed_ports(policy: UrlPolicy, url: str) -> None:
    checked = policy.check(url)
    assert checked.url == url
    assert len(checked.addresses) == 1
    assert not checked.endpoint_allowed


def test_checked_url_keeps_target_and_host_header_exactly() -> None:
    checked = UrlPolicy().check("https://8.8.8.8:443/b/k%2Fx?X-Amz-Signature=a%2Fb&y=#frag")
    assert (checked.scheme, checked.host, checked.port, checked.addresses) == (
        "https",
        "8.8.8.8",
        443,
        ("8.8.8.8",),
    )
    # presigned URLs sign the Host and the query: both are sent exactly as written, the fragment never
    assert checked.host_header == "8.8.8.8:443"
    assert checked.target == "/b/k%2Fx?X-Amz-Signature=a%2Fb&y="


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://8.8.8.8/disk.raw", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://8.8.8.8/", "scheme"),
        ("//8.8.8.8/disk.raw", "scheme"),
        ("http:///disk.raw", "no host"),
        ("http://user:secret@8.8.8.8/", "passwords"),
        ("http://user@8.8.8.8/", "passwords"),
        ("http://8.8.8.8:22/", "port 22"),
        ("http://8.8.8.8:99999/", "port"),
        ("http://8.8.8.8\t/", "whitespace"),
        ("http://8.8.8.8\n.evil/", "whitespace"),
        ("http://8.8.8.8\\@127.0.0.1/", "backslash"),
        ("http://[fe80::1%25eth0]/", "zone"),
        ("http://example.123/", "numeric last label"),
        ("http://exa mple.com/", "whitespace"),
        ("http://-bad-.example/", "not a valid host name"),
        ("", "no URL"),
    ],
)
def test_rejects_malformed_or_unsafe_urls(policy: UrlPolicy, url: str, fragment: str) -> None:
    with pytest.raises(UrlNotAllowed) as err:
        policy.check(url)
    assert fragment in err.value.message


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost."])
def test_rejects_names_resolving_to_loopback(host: str) -> None:
    # the real system resolver: localhost is in /etc/hosts
    with pytest.raises(UrlNotAllowed) as err:
        UrlPolicy().check(f"http://{host}/disk.raw")
    assert "resolves to" in err.value.message and "loopback" in err.value.message


def test_every_resolved_address_must_be_public() -> None:
    dns = fake_dns(
        {"mixed.example": ["8.8.8.8", "10.1.2.3"], "public.example": ["8.8.8.8", "2606:4700::1111"]}
    )
    policy = UrlPolicy(resolver=dns)
    with pytest.raises(UrlNotAllowed, match=r"resolves to 10\.1\.2\.3.*private"):
        policy.check("https://mixed.example/disk.raw")
    checked = policy.check("https://Public.Example./disk.raw")
    assert checked.host == "public.example"
    assert checked.addresses == ("8.8.8.8", "2606:4700::1111")


def test_unresolvable_name_is_refused_as_unreachable_naming_the_host() -> None:
    with pytest.raises(UrlNotAllowed) as info:
        UrlPolicy(resolver=fake_dns({})).check("https://nowhere.example/x")
    assert info.value.code == "Source.Unreachable" and "'nowhere.example'" in info.value.message


def test_name_the_system_resolver_cannot_resolve_is_source_unreachable_without_the_os_text() -> None:
    # the real resolver on a reserved name (RFC 6761: .invalid never resolves), with a presigned URL
    url = "https://disks.nowhere.invalid/disk.raw?X-Amz-Signature=0123456789abcdef&X-Amz-Credential=AKIAX"
    with pytest.raises(HostUnresolvable) as info:
        UrlPolicy().check(url)
    message = info.value.message
    assert info.value.code == "Source.Unreachable"
    assert "https://disks.nowhere.invalid/disk.raw" in message and "'disks.nowhere.invalid'" in message
    assert "Errno" not in message and "not known" not in message and "0123456789abcdef" not in message


def test_resolver_that_did_not_answer_says_it_is_temporary() -> None:
    def no_answer(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(HostUnresolvable, match=r"did not answer: a temporary failure"):
        UrlPolicy(resolver=no_answer).check("http://mirror.example/disk.raw")


def test_resolver_returning_ipv4_mapped_private_address_is_rejected() -> None:
    policy = UrlPolicy(resolver=fake_dns({"sneaky.example": ["::ffff:169.254.169.254"]}))
    with pytest.raises(UrlNotAllowed, match="link-local"):
        policy.check("http://sneaky.example/")


class TestAllowedEndpoints:
    @pytest.fixture
    def policy(self) -> UrlPolicy:
        dns = fake_dns({"minio.internal": ["10.1.2.3"], "localhost": ["127.0.0.1"]})
        return UrlPolicy(allowed_endpoints=["http://127.0.0.1:9000", "http://minio.internal"], resolver=dns)

    def test_exact_endpoint_is_allowed_even_on_loopback_and_odd_port(self, policy: UrlPolicy) -> None:
        checked = policy.check("http://127.0.0.1:9000/bucket/key?sig=1")
        assert checked.endpoint_allowed
        assert checked.addresses == ("127.0.0.1",)

    @pytest.mark.parametrize(
        "url",
        [
            "https://127.0.0.1:9000/bucket/key",  # scheme differs
            "http://127.0.0.1:9001/bucket/key",  # port differs
            "http://127.0.0.1/bucket/key",  # default port differs
            "http://localhost:9000/bucket/key",  # same address, different host
            "http://127.0.0.2:9000/bucket/key",
            "http://minio.internal:8080/x",  # entry without port means the default port only
            "https://minio.internal/x",
        ],
    )
    def test_scheme_host_and_port_all_must_match(self, policy: UrlPolicy, url: str) -> None:
        with pytest.raises(UrlNotAllowed):
            policy.check(url)

    def test_named_endpoint_matches_after_normalisation(self, policy: UrlPolicy) -> None:
        for url in ("http://minio.internal/x", "http://MINIO.internal./x", "http://minio.internal:80/x"):
            checked = policy.check(url)
            assert checked.endpoint_allowed and checked.addresses == ("10.1.2.3",)

    def test_from_config(self, tmp_path: Path) -> None:
        cfg = config.from_dict(
            {"sources": {"allowed_endpoints": ["http://127.0.0.1:9000/"], "allowed_ports": [8443]}}, tmp_path
        )
        policy = UrlPolicy.from_config(cfg.sources)
        assert policy.check("http://127.0.0.1:9000/k").endpoint_allowed
        assert policy.check("https://8.8.8.8:8443/k").port == 8443
        with pytest.raises(UrlNotAllowed, match="port 443"):
            policy.check("https://8.8.8.8/k")

    @pytest.mark.parametrize("entry", ["s3://bucket", "http://host/path", "http://user@host", "http://127.1"])
    def test_malformed_entries_are_configuration_errors(self, entry: str) -> None:
        with pytest.raises(ConfigError, match="allowed_endpoints"):
            UrlPolicy(allowed_endpoints=[entry])


class TestS3Urls:
    def test_checks_the_configured_endpoint(self, tmp_path: Path) -> None:
        s3 = {"endpoint_url": "http://127.0.0.1:9000"}
        denied = UrlPolicy.from_config(config.from_dict({"sources": {"s3": s3}}, tmp_path).sources)
        with pytest.raises(UrlNotAllowed, match=r"'http://127\.0\.0\.1:9000' to sources\.allowed_endpoints"):
            denied.check("s3://import-bucket/disk.raw")
        allowed_cfg = {"sources": {"s3": s3, "allowed_endpoints": ["http://127.0.0.1:9000"]}}
        allowed = UrlPolicy.from_config(config.from_dict(allowed_cfg, tmp_path).sources)
        checked = allowed.check("s3://import-bucket/disk.raw")
        assert (checked.scheme, checked.host, checked.port) == ("s3", "127.0.0.1", 9000)

    @pytest.mark.parametrize(
        "url", ["s3://Bad_Bucket/key", "s3://ab/key", "s3://import-bucket", "s3://import-bucket/"]
    )
    def test_rejects_malformed_s3_urls(self, url: str) -> None:
        with pytest.raises(UrlNotAllowed):
            UrlPolicy().check(url)


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700::1111", True), ("169.254.169.254", False), ("::ffff:10.0.0.1", False)],
)
def test_address_problem(address: str, public: bool) -> None:
    assert (address_problem(address) is None) is public


def test_s3_keys_are_taken_verbatim() -> None:
    from appliance.sources.urlfilter import parse_s3_url

    assert parse_s3_url("s3://import-bucket/dir/disk?v=1#x.raw") == ("import-bucket", "dir/disk?v=1#x.raw")
