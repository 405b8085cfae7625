"""collect_stats refuses models whose forward is split into per-layer graphs (accelerate-style hooks)."""
import pytest
import torch

import kvfx
from helpers import VOCAB, tiny_llama


@torch.compiler.disable
def _dispatch_hook(*args, **kwargs):
    """Stands in for accelerate's AlignDevicesHook.pre_forward, which torch.compile does not trace."""
    return None


def test_layers_behind_untraced_hooks_are_refused():
    model = tiny_llama()
    for layer in model.model.layers:
        def forward(*args, _orig=layer.forward, **kwargs):
            _dispatch_hook()
            return _orig(*args, **kwargs)
        layer.forward = forward
    with pytest.raises(ValueError, match="unsupported: .*not module paths"):
        kvfx.calibrate(model, [torch.randint(0, VOCAB, (1, 8))], method="pca", rank=0.5, progress=False)


def test_batches_call_any_module_the_way_torch_users_expect():
    """A tensor is the first positional argument, a tuple the positional arguments, a dict the keyword arguments:
    a plain module with forward(self, x) calibrates as a transformers model does, with the same statistics."""
    from helpers import hand_model
    m = hand_model(2)
    x = torch.randn(2, 1, 6, 32, generator=torch.Generator().manual_seed(0))  # hidden 32
    got = [kvfx.calibrate(m, batches, method="pca", rank=4, progress=False)
           for batches in ([x[0], x[1]], [(x[0],), (x[1],)], [{"x": x[0]}, {"x": x[1]}])]
    for p in got[1:]:
        for name, site in p.sites.items():
            torch.testing.assert_close(site.key_down, got[0].sites[name].key_down)


def test_first_moments_give_each_site_its_key_and_value_means():
    """collect_stats sums keys and values as SiteStats.add sees them; fit records their means on every site (what
    low-bit latents are rounded around), for each granularity."""
    from kvfx.calib.collect import collect_stats, fit
    from kvfx.calib.stats import SiteStats
    seen = {}
    add = SiteStats.add

    def spy(self, q, k, v, *mask_args):
        seen.setdefault(id(self), []).append((k.detach().double(), v.detach().double()))
        add(self, q, k, v, *mask_args)
    model = tiny_llama()
    SiteStats.add = spy
    try:
        stats = collect_stats(model, [torch.randint(0, VOCAB, (2, 8)) for _ in range(2)], progress=False)
    finally:
        SiteStats.add = add
    for name, st in stats.items():
        k = torch.cat([a.transpose(1, 2).reshape(-1, st.kv_heads, st.head_dim) for a, _ in seen[id(st)]])
        v = torch.cat([b.transpose(1, 2).reshape(-1, st.kv_heads, st.head_dim) for _, b in seen[id(st)]])
        km, vm = st.means()
        torch.testing.assert_close(km, k.mean(0).float())
        torch.testing.assert_close(vm, v.mean(0).float())
    for granularity in ("head", "layer", "kv"):
        P = fit(stats, "pca" if granularity != "kv" else "kqsvd", 0.5, granularity=granularity)
        for name, p in P.sites.items():
            assert torch.equal(p.key_mean, stats[name].means()[0]) and torch.equal(p.value_mean, stats[name].means()[1])
            assert p.latent_offsets()[0] is not None
