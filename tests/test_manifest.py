"""Manifest codec and chunk maths: round trips (property tests) and refusals (tables)."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ManifestError, UsageError
from agent.manifest import (DEFAULT_MAX_CHUNK, DEFAULT_MIN_CHUNK, MAX_FILE_SIZE, FileEntry, ModelRef,
                            build_manifest, check_relpath, chunk_count, chunk_span, decode,
                            default_chunk_size, encode, make_listing)

CS = 64 * 1024
H = bytes(32)

component = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FF,
                                           blacklist_characters="/\\\x7f"), min_size=1, max_size=12) \
    .filter(lambda c: c not in (".", "..") and not c.endswith(".partial"))
paths = st.lists(component, min_size=1, max_size=3).map("/".join).filter(lambda p: not p[1:2] == ":")


@st.composite
def manifests(draw):
    chunk_size = draw(st.sampled_from([16 * 1024, CS, 1 << 20, 16 << 20]))
    names = draw(st.lists(paths, min_size=0, max_size=8, unique=True))
    # drop paths that are directories of other paths
    names = [n for n in names if not any(o.startswith(n + "/") for o in names)]
    files = []
    for name in names:
        size = draw(st.integers(min_value=0, max_value=chunk_size * 5))
        chunks = tuple(draw(st.binary(min_size=32, max_size=32)) for _ in range(chunk_count(size, chunk_size)))
        files.append(FileEntry(name, size, draw(st.binary(min_size=32, max_size=32)), chunks))
    return build_manifest("owner/model-x", draw(st.sampled_from(["master", "v1.0", "abc123"])), chunk_size, files)


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_manifest_round_trips_and_its_id_is_stable(m):
    data = encode(m)
    again = decode(data)
    assert again == m
    assert encode(again) == data
    assert again.id == m.id == __import__("blake3").blake3(data).hexdigest()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoding_garbage_only_ever_raises_manifest_error(data):
    try:
        decode(data)
    except ManifestError:
        pass


@pytest.mark.parametrize("path,why", [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("../secret", "'..'"),
    ("a/../../b", "'..'"),
    ("a/./b", "'.'"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("a\\b", "backslash"),
    ("a\x00b", "NUL"),
    ("a\nb", "control"),
    ("C:/x", "drive letter"),
    ("model.bin.partial", ".partial"),
    ("x" * 300, "longer than 255"),
    ("/".join(["abc"] * 400), "longer than 1024"),
])
def test_unsafe_paths_are_refused_with_a_reason(path, why):
    with pytest.raises(ManifestError) as info:
        check_relpath(path)
    assert why in str(info.value)


@pytest.mark.parametrize("path", ["config.json", "a/b/c.safetensors", "tokenizer/vocab.txt", "..hidden", "a..b",
                                  "模型/权重.bin", ".gitattributes"])
def test_ordinary_paths_are_accepted(path):
    assert check_relpath(path) == path


def test_duplicate_and_file_versus_directory_paths_are_refused():
    with pytest.raises(ManifestError, match="appears twice"):
        make_listing("o/m", "master", [("a", 1, "00" * 32), ("a", 1, "00" * 32)])
    with pytest.raises(ManifestError, match="lies under 'a'"):
        make_listing("o/m", "master", [("a", 1, "00" * 32), ("a/b", 1, "00" * 32)])


@pytest.mark.parametrize("size", [-1, MAX_FILE_SIZE + 1, "12", 1.5, True])
def test_absurd_sizes_are_refused(size):
    with pytest.raises(ManifestError, match="absurd size"):
        make_listing("o/m", "master", [("weights.bin", size, "00" * 32)])


def test_listing_without_a_valid_sha256_is_refused():
    with pytest.raises(ManifestError, match="no valid SHA-256"):
        make_listing("o/m", "master", [("weights.bin", 3, "zz")])
    with pytest.raises(ManifestError, match="no valid SHA-256"):
        make_listing("o/m", "master", [("weights.bin", 3, None)])


def _raw(files, chunk_size=CS, model="o/m", revision="master", version=1):
    return msgpack.packb([version, model, revision, chunk_size, files], use_bin_type=True)


@pytest.mark.parametrize("data,message", [
    (_raw([["a", 10, H, []]]), "needs 1 chunk hashes"),
    (_raw([["a", 10, H, [H, H]]]), "needs 1 chunk hashes"),
    (_raw([["a", 10, b"short", [H]]]), "not a 32-byte hash"),
    (_raw([["a", 10, H + H, [H]]]), "not valid msgpack"),  # bin over the 32-byte limit
    (_raw([["b", 1, H, [H]], ["a", 1, H, [H]]]), "not sorted"),
    (_raw([["../x", 1, H, [H]]]), "unsafe file path"),
    (_raw([], chunk_size=1000), "power of two"),
    (_raw([], version=2), "upgrade shoal"),
    (_raw([], model="no-owner"), "bad model"),
    (_raw([], revision="../x"), "bad model"),
    (b"\x93\x01\x02\x03", "5-element array"),
    (_raw([["a", 1, H, [H]]])[:-5], "not valid msgpack"),
])
def test_bad_manifests_are_refused_with_a_clear_message(data, message):
    with pytest.raises(ManifestError) as info:
        decode(data)
    assert message in str(info.value)


def test_non_canonical_encoding_is_refused():
    # Same content, but the size as a 64-bit int instead of the shortest form.
    m = build_manifest("o/m", "master", CS, [FileEntry("a", 1, H, (H,))])
    canonical = encode(m)
    assert decode(canonical) == m
    wide = canonical.replace(b"\xa1a\x01", b"\xa1a\xcf" + (1).to_bytes(8, "big"))
    assert wide != canonical
    with pytest.raises(ManifestError, match="not canonical"):
        decode(wide)


@given(st.integers(min_value=0, max_value=10 ** 12), st.sampled_from([16 * 1024, CS, 4 << 20]))
def test_chunk_spans_tile_the_file(size, chunk_size):
    n = chunk_count(size, chunk_size)
    if n:
        first, last = chunk_span(size, chunk_size, 0), chunk_span(size, chunk_size, n - 1)
        assert first[0] == 0
        assert last[0] + last[1] == size
        assert 0 < last[1] <= chunk_size
    with pytest.raises(IndexError):
        chunk_span(size, chunk_size, n)


@pytest.mark.parametrize("total,expected", [(0, DEFAULT_MIN_CHUNK), (100 << 20, DEFAULT_MIN_CHUNK),
                                            (15 << 30, DEFAULT_MAX_CHUNK), (3 << 30, 4 << 20),
                                            (5 << 30, 8 << 20)])
def test_default_chunk_size_is_bounded(total, expected):
    assert default_chunk_size(total) == expected


def test_model_refs_parse_and_refuse():
    assert ModelRef.parse("qwen/Qwen2.5-0.5B-Instruct") == ModelRef("qwen/Qwen2.5-0.5B-Instruct", "master")
    assert ModelRef.parse("qwen/x@v1.0").revision == "v1.0"
    for bad in ["qwen", "qwen/x/y", "../x", "qwen/x@", "qwen/x@a/b", "qwen/x@..", "/x"]:
        if bad == "qwen/x@":
            assert ModelRef.parse(bad).revision == "master"
            continue
        with pytest.raises(UsageError):
            ModelRef.parse(bad)


def test_listing_sorts_and_keeps_hashes():
    sha = hashlib.sha256(b"x").hexdigest()
    listing = make_listing("o/m", "master", [("b", 1, sha), ("a", 2, sha)])
    assert [f.path for f in listing.files] == ["a", "b"]
    assert listing.total_size == 3
    assert listing.files[0].sha256 == bytes.fromhex(sha)
