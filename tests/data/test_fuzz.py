"""Hostile shards, manifests and configs (hypothesis, a bounded number of examples): each gives a
named error (a tar error, a user error naming the file) or works; none crashes otherwise,
allocates what a header merely claims, or reads past the shard's end."""

import io
import json
import string
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, load_config
from pipeline.data.shards import resolve_shards
from pipeline.data.tarindex import ShardIndex, count_samples, shard_members, shard_samples
from pipeline.errors import UserError

NAMED = (tarfile.TarError, UserError)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_tar(members: list[tuple[str, bytes]], kind: bytes = tarfile.REGTYPE) -> bytearray:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))
    return bytearray(buffer.getvalue())


def set_header(raw: bytearray, offset: int, **fields) -> bytearray:
    """Rewrite fields of the header at ``offset`` (size, kind) and its checksum."""
    if "size" in fields:
        raw[offset + 124:offset + 136] = b"%011o\0" % fields["size"]
    if "kind" in fields:
        raw[offset + 156:offset + 157] = fields["kind"]
    raw[offset + 148:offset + 156] = b" " * 8
    raw[offset + 148:offset + 156] = b"%06o\0 " % sum(raw[offset:offset + 512])
    return raw


def read_everything(path: Path) -> None:
    """Every reader of a local shard, as training, resume and evaluation use them."""
    index = ShardIndex.walk(str(path))
    count_samples(str(path))
    list(shard_samples(str(path)))
    list(shard_samples(str(path), skip=0, count=1))
    list(shard_members(str(path), range(len(index))))


def survives(path: Path, limit_bytes: int = 64 * 2**20) -> None:
    tracemalloc.start()
    try:
        read_everything(path)
    except NAMED:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit_bytes, f"{peak / 2**20:.0f} MB allocated reading a {path.stat().st_size}-byte shard"


VALID = bytes(make_tar([("a.jpg", b"\xff\xd8" + b"x" * 600 + b"\xff\xd9"), ("a.cls", b"3"),
                        ("b.jpg", b"y" * 100), ("b.cls", b"1")]))


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_as_a_shard(tmp_path, data):
    path = tmp_path / "random.tar"
    path.write_bytes(data)
    survives(path)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=16))
def test_a_shard_with_bytes_flipped(tmp_path, flips):
    raw = bytearray(VALID)
    for at, value in flips:
        raw[at] = value
    path = tmp_path / "flipped.tar"
    path.write_bytes(raw)
    survives(path)


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_header_that_claims_4_gb_is_refused_without_allocating_it(tmp_path, kind):
    path = tmp_path / "claims.tar"
    path.write_bytes(set_header(make_tar([("a.jpg", b"x" * 10), ("a.cls", b"1")]), 0, size=4 * 2**30, kind=kind))
    with pytest.raises(tarfile.ReadError, match="claims 4,294,967,296 bytes, past the shard's end"):
        ShardIndex.walk(str(path))
    survives(path, limit_bytes=8 * 2**20)


def test_member_names_that_climb_out_or_link_stay_names(tmp_path):
    """'..' and absolute names are keys like any other (nothing is extracted to disk); a symlink
    is no sample file; nothing past the shard is read."""
    path = tmp_path / "names.tar"
    path.write_bytes(make_tar([("../../etc/passwd.jpg", b"x" * 10), ("../../etc/passwd.cls", b"1"),
                               ("/abs/key.jpg", b"y"), ("/abs/key.cls", b"2")]))
    index = ShardIndex.walk(str(path))
    assert [index.sample(i)[0] for i in range(len(index))] == ["../../etc/passwd", "/abs/key"]
    samples = [s for _, s in shard_members(str(path), range(len(index)))]
    assert [s["cls"] for s in samples] == [b"1", b"2"]
    link = tmp_path / "link.tar"
    link.write_bytes(make_tar([("c.jpg", b"")], kind=tarfile.SYMTYPE))
    assert len(ShardIndex.walk(str(link))) == 0


SCALARS = st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8)
JSON = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["shards", "url", "num_samples", "num_bytes", "classes", "split", "x"]), inner,
                        max_size=5), max_leaves=20)


@FUZZ
@given(JSON)
def test_malformed_manifests_are_named(tmp_path, manifest):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(manifest))
    try:
        resolve_shards(str(path))
    except UserError as e:
        assert str(path) in str(e)


@FUZZ
@given(st.text(alphabet=string.printable + "{}[]:-'\"\u00e9\u2603", max_size=300))
def test_random_config_text_is_a_config_error(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    try:
        load_config(str(path))
    except ConfigError:
        pass


@FUZZ
@given(st.lists(st.text(alphabet=string.ascii_letters + "._=-[]{}0123456789 ", max_size=30), max_size=4))
def test_random_overrides_are_config_errors(overrides):
    try:
        load_config("demo/pretrain", overrides)
    except ConfigError:
        pass
