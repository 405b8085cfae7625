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
