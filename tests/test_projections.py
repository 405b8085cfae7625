"""kvfx.projections: validation, the versioned safetensors file format, rank resolution."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from kvfx.projections import FORMAT_VERSION, Projections, ProjectionError, SiteProjection, SiteShape, resolve_rank

H, HKV, D = 4, 2, 8
NAMES = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def make(rank=4, names=NAMES, seed=0, **overrides) -> Projections:
    g = torch.Generator().manual_seed(seed)
    sites = {}
    for n in names:
        t = {k: torch.randn(HKV, D, rank, generator=g) for k in ("key_down", "key_up", "value_down", "value_up")}
        t.update(overrides)
        sites[n] = SiteProjection(**t)
    return Projections(sites, {n: SiteShape(H, HKV, D) for n in names}, method="test", report={"err": 0.25})


def assert_same(a: Projections, b: Projections):
    assert list(a.sites) == list(b.sites)
    assert a.shapes == b.shapes and a.method == b.method and a.report == b.report
    for n in a.sites:
        for k, t in (a.sites[n].tensors() | a.sites[n].means()).items():
            assert torch.equal(t, (b.sites[n].tensors() | b.sites[n].means())[k]), (n, k)
        assert set(a.sites[n].means()) == set(b.sites[n].means())


# ---------------------------------------------------------------------------------------------- basics
def test_identity_is_eye_per_kv_head():
    p = SiteProjection.identity(HKV, D)
    for t in p.tensors().values():
        assert t.shape == (HKV, D, D) and torch.equal(t, torch.eye(D).expand(HKV, D, D))
    p.key_down[0, 0, 0] = 5.0  # independent tensors, not views of one another
    assert p.key_up[0, 0, 0] == 1.0 and p.key_down[1, 0, 0] == 1.0


def test_ranks_fraction_and_repr():
    p = make(rank=2)
    assert p.ranks == {n: [2, 2] for n in NAMES}
    assert p.kv_fraction() == pytest.approx(2 / 8)
    assert "sites=2" in repr(p) and "kv_fraction=0.250" in repr(p)


def test_to_dtype_copies():
    p = make()
    q = p.to(dtype=torch.float64)
    assert q.sites[NAMES[0]].key_down.dtype == torch.float64
    assert p.sites[NAMES[0]].key_down.dtype == torch.float32
    assert q.shapes == p.shapes and q.method == p.method


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("rank", [0, D + 1])
def test_rank_out_of_range(rank):
    with pytest.raises(ProjectionError, match=r"rank %d is outside 1\.\.%d" % (rank, D)):
        make(rank=rank)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_rejected(bad):
    t = torch.randn(HKV, D, 4)
    t[1, 2, 3] = bad
    with pytest.raises(ProjectionError, match="NaN/inf.*recalibrate"):
        make(value_up=t)


def test_integer_tensor_rejected():
    with pytest.raises(ProjectionError, match="not floating point"):
        make(key_up=torch.ones(HKV, D, 4, dtype=torch.int64))


def test_wrong_heads_or_head_dim():
    with pytest.raises(ProjectionError, match=r"does not fit 2 kv heads × head_dim 8.*another model"):
        make(key_down=torch.randn(HKV, 16, 4))
    with pytest.raises(ProjectionError, match="does not fit"):
        make(value_down=torch.randn(3, D, 4))


def test_not_3d():
    with pytest.raises(ProjectionError, match=r"expected a \[kv_heads, head_dim, rank\] tensor"):
        make(key_up=torch.randn(D, 4))


def test_up_down_rank_differ():
    with pytest.raises(ProjectionError, match="differ in rank"):
        make(value_up=torch.randn(HKV, D, 3))


def test_empty_and_missing_shape():
    with pytest.raises(ProjectionError, match="no attention sites"):
        Projections({}, {})
    p = SiteProjection.identity(HKV, D)
    with pytest.raises(ProjectionError, match="needs a shape entry"):
        Projections({"a": p}, {"b": SiteShape(H, HKV, D)})


def test_check_site():
    p = make()
    assert p.check_site(NAMES[0], SiteShape(H, HKV, D)) is p.sites[NAMES[0]]
    with pytest.raises(ProjectionError, match="No projection for attention site 'x.attn'.*recalibrate"):
        p.check_site("x.attn", SiteShape(H, HKV, D))
    with pytest.raises(ProjectionError, match=r"\[4, 2, 16\].*\[4, 2, 8\]: another model"):
        p.check_site(NAMES[0], SiteShape(H, HKV, 16))


def test_validate_catches_later_mutation():
    p = make()
    p.sites[NAMES[1]].key_down = torch.full((HKV, D, 4), float("nan"))
    with pytest.raises(ProjectionError, match="NaN"):
        p.validate()


# ---------------------------------------------------------------------------------------------- files
def test_save_load_roundtrip(tmp_path):
    p = make()
    path = tmp_path / "p.safetensors"
    p.save(path)
    assert_same(p, Projections.load(path))
    assert_same(p, Projections.load(str(path)))


def test_file_metadata(tmp_path):
    from safetensors import safe_open
    path = tmp_path / "p.safetensors"
    make(rank=3).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == "kvfx.projections"
    assert meta["format_version"] == "2"  # no means: readable by the kvfx before format 3
    assert meta["method"] == "test"
    assert json.loads(meta["sites"]) == NAMES
    assert json.loads(meta["fingerprint"]) == {n: [H, HKV, D] for n in NAMES}
    assert json.loads(meta["ranks"]) == {n: [3, 3] for n in NAMES}
    assert json.loads(meta["report"]) == {"err": 0.25}
    assert keys == {f"{n}/{k}" for n in NAMES for k in ("key_down", "key_up", "value_down", "value_up")}


def centred(p: Projections, seed=1) -> Projections:
    g = torch.Generator().manual_seed(seed)
    return Projections({n: s.centred(torch.randn(HKV, D, generator=g), torch.randn(HKV, D, generator=g))
                        for n, s in p.sites.items()}, dict(p.shapes), p.method, dict(p.report))


def test_means_roundtrip_as_format_3(tmp_path):
    from safetensors import safe_open
    p = centred(make())
    path = tmp_path / "p.safetensors"
    p.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == str(FORMAT_VERSION) == "3"
        assert {f"{NAMES[0]}/key_mean", f"{NAMES[0]}/value_mean"} <= set(f.keys())
    back = Projections.load(path)
    assert_same(p, back)
    assert_same(p, p.to(torch.float64))  # means stay float32; the factors change dtype (compared by equal values)
    assert back.sites[NAMES[0]].like(key_down=back.sites[NAMES[0]].key_down * 2, key_up=back.sites[NAMES[0]].key_up,
                                      value_down=back.sites[NAMES[0]].value_down,
                                      value_up=back.sites[NAMES[0]].value_up).means().keys() == {"key_mean", "value_mean"}


def test_latent_offsets_are_the_means_latents():
    p = centred(make()).sites[NAMES[0]]
    k, v = p.latent_offsets()
    assert k.shape == (HKV, 1, 4) and v.shape == (HKV, 1, 4)
    torch.testing.assert_close(k[:, 0], torch.einsum("hd,hdr->hr", p.key_mean, p.key_down))
    torch.testing.assert_close(v[:, 0], torch.einsum("hd,hdr->hr", p.value_mean, p.value_down))
    assert make().sites[NAMES[0]].latent_offsets() == (None, None)
    g = torch.Generator().manual_seed(2)
    a, c = torch.randn(1, HKV * D, 5, generator=g), torch.randn(1, HKV * D, 5, generator=g)
    b, d = torch.randn(HKV, D, 5, generator=g), torch.randn(HKV, D, 5, generator=g)
    km, vm = torch.randn(HKV, D, generator=g), torch.randn(HKV, D, generator=g)
    shared = SiteProjection(a, b, c, d, shared=True, key_mean=km, value_mean=vm)
    off, none = shared.latent_offsets()
    assert none is None and off.shape == (1, 1, 5)
    torch.testing.assert_close(off[0, 0], km.reshape(-1) @ a[0] + vm.reshape(-1) @ c[0])


def test_bad_means_refused():
    p = make()
    p.sites[NAMES[0]] = p.sites[NAMES[0]].centred(torch.zeros(HKV, D + 1), torch.zeros(HKV, D))
    with pytest.raises(ProjectionError, match="key_mean.*means of shape"):
        p.validate()


def test_load_missing(tmp_path):
    with pytest.raises(ProjectionError, match="not found.*projections.save"):
        Projections.load(tmp_path / "nope.safetensors")


def test_load_random_bytes(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ProjectionError, match="corrupt or not a safetensors file"):
        Projections.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.95, 0.0])
def test_load_truncated(tmp_path, keep):
    path = tmp_path / "p.safetensors"
    make().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ProjectionError, match="corrupt"):
        Projections.load(path)


def file_tensors(p: Projections) -> dict:
    """The tensors of a projections file, as Projections.save names them."""
    return {f"{n}/{k}": t for n, s in p.sites.items() for k, t in s.tensors().items()}


def test_load_not_kvfx(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ProjectionError, match="not a kvfx projections file"):
        Projections.load(path)


def test_load_future_version(tmp_path):
    path = tmp_path / "p.safetensors"
    p = make()
    tensors = file_tensors(p)
    save_file(tensors, str(path), metadata={"format": "kvfx.projections", "format_version": str(FORMAT_VERSION + 1),
                                            "sites": json.dumps(NAMES)})
    with pytest.raises(ProjectionError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade kvfx"):
        Projections.load(path)


def test_load_metadata_disagrees(tmp_path):
    path = tmp_path / "p.safetensors"
    p = make()
    tensors = file_tensors(p)
    del tensors[f"{NAMES[1]}/value_up"]
    meta = {"format": "kvfx.projections", "format_version": "1", "sites": json.dumps(NAMES),
            "fingerprint": json.dumps({n: [H, HKV, D] for n in NAMES})}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ProjectionError, match="metadata and tensors disagree"):
        Projections.load(path)


def test_load_validates_contents(tmp_path):
    """A well-formed file whose tensors are bad (NaN) is refused on load, not at compress time."""
    path = tmp_path / "p.safetensors"
    p = make()
    tensors = file_tensors(p)
    tensors[f"{NAMES[0]}/key_up"] = torch.full((HKV, D, 4), float("nan"))
    meta = {"format": "kvfx.projections", "format_version": "1", "sites": json.dumps(NAMES),
            "fingerprint": json.dumps({n: [H, HKV, D] for n in NAMES})}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ProjectionError, match="NaN"):
        Projections.load(path)


@settings(max_examples=15, deadline=None)
@given(kv=st.integers(1, 3), group=st.integers(1, 3), d=st.integers(1, 12), data=st.data())
def test_roundtrip_property(tmp_path_factory, kv, group, d, data):
    rk, rv = data.draw(st.integers(1, d)), data.draw(st.integers(1, d))
    layers = data.draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    rnd = lambda r: torch.randn(kv, d, r, generator=g).to(dtype)  # noqa: E731
    names = [f"blocks.{i}.attn" for i in range(layers)]
    p = Projections({n: SiteProjection(rnd(rk), rnd(rk), rnd(rv), rnd(rv)) for n in names},
                    {n: SiteShape(kv * group, kv, d) for n in names}, method="prop")
    path = tmp_path_factory.mktemp("rt") / "p.safetensors"
    p.save(path)
    q = Projections.load(path)
    assert_same(p, q)
    assert q.ranks == {n: [rk, rv] for n in names}
    assert q.kv_fraction() == pytest.approx((rk + rv) / (2 * d))


# ---------------------------------------------------------------------------------------------- resolve_rank
@pytest.mark.parametrize("rank,expected", [(0.5, 4), (1.0, 8), (1, 1), (8, 8), (3, 3), (0.01, 1),
                                           (0.3, 2)])
def test_resolve_rank(rank, expected):
    """By type: a float is a keep fraction (1.0 = full width), an int a count (1 = rank one)."""
    assert resolve_rank(rank, 8) == expected


@pytest.mark.parametrize("rank", [0, 9, -1, 0.0, -0.5, 1.5, 4.0, math.nan, True, "0.5", None])  # 4.0: not a count
def test_resolve_rank_bad(rank):
    with pytest.raises(ProjectionError, match="rank"):
        resolve_rank(rank, 8)

