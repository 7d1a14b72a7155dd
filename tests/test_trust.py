"""Publisher identity, signed manifests and the trust policy a LAN peer's manifest meets."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError, ManifestError
from agent.errors import UntrustedManifest
from agent.swarm.trust import Identity, TrustPolicy, decode_signature, parse_publishers
from conftest import MODEL_ID, mirror, run_shoal

MID = "ab" * 32
OTHER = "cd" * 32


def test_the_identity_is_created_owner_only_and_reloaded(tmp_path):
    key = tmp_path / "identity.key"
    first = Identity.load_or_create(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    assert Identity.load_or_create(key).publisher_id == first.publisher_id
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load_or_create(key)


def test_signed_by_a_trusted_publisher_or_pinned_is_accepted(tmp_path):
    teacher = Identity.load_or_create(tmp_path / "t.key")
    envelope = teacher.sign_manifest(MID)
    assert TrustPolicy(frozenset({teacher.publisher_id})).check(MID, envelope).startswith("signed by")
    assert TrustPolicy(pinned=frozenset({MID})).check(MID, None) == "pinned"


@pytest.mark.parametrize("case,message", [
    ("unsigned", "not signed, and you did not pin it"),
    ("stranger", "a publisher you do not trust"),
    ("other_manifest", "is for manifest"),
    ("forged", "forged or damaged signature"),
])
def test_untrusted_manifests_are_refused_with_what_to_do(tmp_path, case, message):
    teacher = Identity.load_or_create(tmp_path / "t.key")
    stranger = Identity.load_or_create(tmp_path / "s.key")
    policy = TrustPolicy(frozenset({teacher.publisher_id}))
    envelope = {
        "unsigned": None,
        "stranger": stranger.sign_manifest(MID),
        "other_manifest": teacher.sign_manifest(OTHER),
        "forged": msgpack.packb([1, MID, teacher.public_key, bytes(64)], use_bin_type=True),
    }[case]
    with pytest.raises(UntrustedManifest) as info:
        policy.check(MID, envelope)
    assert message in str(info.value)


@given(st.binary(max_size=300))
def test_garbage_signatures_only_raise_manifest_errors(data):
    try:
        decode_signature(data)
    except ManifestError:
        pass


def test_publisher_keys_are_validated():
    key = "0f" * 32
    assert parse_publishers(f"{key}, {key.upper()}") == frozenset({key})
    assert parse_publishers([key]) == frozenset({key})
    with pytest.raises(ConfigError, match="64-hex-digit"):
        parse_publishers("teacher")


def test_shoal_publish_signs_the_cached_manifest(env, hub, oss, model_dir):
    mirror(env, model_dir)
    run_shoal(["pull", MODEL_ID], env, check=True)
    key = run_shoal(["id"], env, check=True).stdout.strip()
    proc = run_shoal(["publish", MODEL_ID], env, check=True)
    assert f"SHOAL_TRUSTED_PUBLISHERS={key}" in proc.stdout
    manifest_id = proc.stdout.split("manifest ")[1].split()[0]
    envelope = (os.path.join(env["SHOAL_CACHE_DIR"], "manifests", f"{manifest_id}.sig"))
    with open(envelope, "rb") as f:
        assert TrustPolicy(frozenset({key})).check(manifest_id, f.read()).startswith("signed by")
    proc = run_shoal(["publish", "lab/not-here"], env)
    assert proc.returncode == 3
    env["SHOAL_TRUSTED_PUBLISHERS"] = "teacher"
    assert run_shoal(["ls"], env).returncode == 2
