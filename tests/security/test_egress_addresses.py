"""Issue 12, item 4: which addresses a webhook may connect to (the pure rule, `rules.address_block_reason`).

A target is reachable only at a globally routable unicast address; every form that is, embeds or
maps a loopback, private, link-local or otherwise special address is refused.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.alerts.rules import OUTCOMES, address_block_reason, is_public_address, status_outcome

V4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)
V6 = st.integers(min_value=0, max_value=2**128 - 1).map(ipaddress.IPv6Address)
PRIVATE_V4 = st.sampled_from(["127.0.0.1", "127.255.0.9", "10.0.0.1", "172.16.5.4", "192.168.0.1",
                              "169.254.169.254", "100.64.0.1", "0.0.0.0", "198.18.0.1", "192.0.2.1"])


def v4_in(cidr: str) -> st.SearchStrategy[ipaddress.IPv4Address]:
    net = ipaddress.IPv4Network(cidr)
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(ipaddress.IPv4Address)


def v6_in(cidr: str) -> st.SearchStrategy[ipaddress.IPv6Address]:
    net = ipaddress.IPv6Network(cidr)
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(ipaddress.IPv6Address)


def six_to_four(v4: ipaddress.IPv4Address, rest: int) -> str:
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | (rest & (2**80 - 1))))


def nat64(v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(v4)))


def mapped(v4: ipaddress.IPv4Address) -> str:
    return f"::ffff:{v4}"


@pytest.mark.parametrize("address", [
    "2002:7f00:1::",  # the probe's 6to4 address of 127.0.0.1, which the guard let through
    "2002:a00:1::1", "2002:a9fe:a9fe::",  # 6to4 of 10.0.0.1, of 169.254.169.254
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",  # NAT64 of 127.0.0.1, of 169.254.169.254
    "64:ff9b:1::1", "64:ff9b:1:ffff::808:808",  # local-use NAT64: never
    "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "::ffff:127.0.0.1", "::ffff:10.1.2.3", "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1", "::10.0.0.1",  # IPv4-compatible
    "::", "::1", "0.0.0.0", "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "169.254.169.254", "fe80::1", "fe80::1%eth0", "fd00::1", "fc00::1", "fec0::1",
    "100.64.0.1", "100.127.255.254",  # CGNAT
    "198.18.0.1", "198.19.255.255", "2001:2::1",  # benchmarking
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1", "3fff::1",  # documentation
    "224.0.0.1", "239.255.255.250", "ff02::1", "ff0e::1",  # multicast
    "240.0.0.1", "255.255.255.255", "192.0.0.8", "192.88.99.1", "100::1", "5f00::1", "4000::1",
])
def test_special_addresses_are_refused(address: str) -> None:
    assert address_block_reason(address) is not None
    assert not is_public_address(address)


@pytest.mark.parametrize("address", [
    "93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:2800:220:1:248:1893:25c8:1946", "2a00:1450:4001:82b::200e",
    "2002:808:808::1",  # 6to4 of a public address
    "64:ff9b::808:808",  # NAT64 of a public address
    "::ffff:8.8.8.8",
])
def test_global_unicast_addresses_are_allowed(address: str) -> None:
    assert address_block_reason(address) is None


def test_the_reason_names_the_embedded_class() -> None:
    assert address_block_reason("2002:7f00:1::") == "6to4 address of a loopback IPv4 address"


def test_a_host_name_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        address_block_reason("example.org")


@given(V4)
def test_an_ipv4_address_python_calls_non_global_is_refused(ip: ipaddress.IPv4Address) -> None:
    if not ip.is_global:
        assert not is_public_address(str(ip))


@given(V6)
def test_an_ipv6_address_python_calls_non_global_is_refused(ip: ipaddress.IPv6Address) -> None:
    if not ip.is_global and ip.ipv4_mapped is None:
        assert not is_public_address(str(ip))


@given(st.one_of(*(v4_in(c) for c in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8",
                                      "169.254.0.0/16", "100.64.0.0/10", "198.18.0.0/15", "224.0.0.0/4",
                                      "240.0.0.0/4", "0.0.0.0/8"))))
def test_every_address_of_the_special_ipv4_blocks_is_refused(ip: ipaddress.IPv4Address) -> None:
    assert not is_public_address(str(ip))


@given(V4, st.integers(min_value=0, max_value=2**80 - 1))
def test_a_6to4_address_is_judged_by_the_ipv4_address_it_embeds(ip: ipaddress.IPv4Address, rest: int) -> None:
    assert is_public_address(six_to_four(ip, rest)) == is_public_address(str(ip))


@given(V4)
def test_a_nat64_address_is_judged_by_the_ipv4_address_it_embeds(ip: ipaddress.IPv4Address) -> None:
    assert is_public_address(nat64(ip)) == is_public_address(str(ip))


@given(V4)
def test_an_ipv4_mapped_address_is_judged_by_the_ipv4_address_it_maps(ip: ipaddress.IPv4Address) -> None:
    assert is_public_address(mapped(ip)) == is_public_address(str(ip))


@given(PRIVATE_V4, st.integers(min_value=0, max_value=2**80 - 1))
def test_no_embedding_of_a_private_ipv4_address_is_allowed(v4: str, rest: int) -> None:
    ip = ipaddress.IPv4Address(v4)
    assert not any(is_public_address(a) for a in (six_to_four(ip, rest), nat64(ip), mapped(ip), f"::{v4}"))


@given(st.one_of(v6_in("2001::/32"), v6_in("64:ff9b:1::/48"), v6_in("fc00::/7"), v6_in("fe80::/10"),
                 v6_in("ff00::/8"), v6_in("::/96"), v6_in("2001:db8::/32"), v6_in("100::/64")))
def test_every_address_of_the_special_ipv6_blocks_is_refused(ip: ipaddress.IPv6Address) -> None:
    assert not is_public_address(str(ip))


@given(V6)
def test_ipv6_outside_global_unicast_is_refused_unless_it_carries_a_public_ipv4(ip: ipaddress.IPv6Address) -> None:
    carries_v4 = ip.ipv4_mapped is not None or ip in ipaddress.IPv6Network("64:ff9b::/96")
    if ip not in ipaddress.IPv6Network("2000::/3") and not carries_v4:
        assert not is_public_address(str(ip))


@given(st.integers(min_value=100, max_value=999))
def test_a_status_code_becomes_its_class_only(status: int) -> None:
    outcome = status_outcome(status)
    assert outcome in OUTCOMES and str(status) not in outcome
    assert outcome == ("2xx" if 200 <= status < 300 else "3xx" if 300 <= status < 400
                       else "4xx" if 400 <= status < 500 else "5xx")
