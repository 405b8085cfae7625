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
