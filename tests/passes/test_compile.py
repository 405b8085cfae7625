"""Pass 4 (compile): what kvfx's backend hands the inner compiler."""
import torch
from torch._subclasses.fake_tensor import FakeTensor

import kvfx
from kvfx.passes.compile import CompileOptions, KvfxBackend, compile_isolated

from helpers import random_projections, tiny_llama


def test_constants_reach_the_compiler_with_static_shapes():
    """Under a dynamic-shape compile, kvfx's constants (projections, folded weights) enter as fake tensors
    of fixed size: real tensors would be fakified with fresh, sourceless symbols, and a guard on one of them
    (e.g. key rank != value rank, a keys-only joint latent on SmolLM2) broke Dynamo's guard building."""
    m = tiny_llama(layers=1)
    proj = random_projections(m, rank=4, kind="oblique")
    seen = []

    def inner(gm, example_inputs):
        seen.append(list(example_inputs))
        return gm.forward

    backend = KvfxBackend(proj, CompileOptions(backend=inner))
    fwd = compile_isolated(m.forward, backend=backend, dynamic=True)
    ids = torch.randint(3, 60, (1, 12))
    out = fwd(input_ids=ids, use_cache=False).logits
    assert out.shape == (1, 12, m.config.vocab_size) and kvfx.counters["kvfx"]["rewritten"] == 1
    (example,) = seen
    places = backend.graphs[0].graph.find_nodes(op="placeholder")
    consts = [t for t, node in zip(example, places) if node.name.startswith("kvfx_")]
    dynamo_vals = [node.meta["example_value"] for node in places if not node.name.startswith("kvfx_")]
    assert any(isinstance(s, torch.SymInt) for t in dynamo_vals if isinstance(t, torch.Tensor) for s in t.shape)
    assert consts and all(isinstance(t, FakeTensor) and all(isinstance(s, int) for s in t.shape) for t in consts)


def test_inference_graphs_drop_the_wrappers_size_asserts_unless_the_user_keeps_them():
    """CPU inference graphs compile with DECODE_PATCHES (no assert_size_stride after each op call in Inductor's
    wrapper); the user's own Inductor options win; a graph compiled with grad on keeps Inductor's defaults."""
    import copy
    from torch._inductor.utils import run_and_get_code
    m = tiny_llama(layers=1)
    proj = random_projections(m, rank=4)
    ids = torch.randint(3, 60, (1, 6))

    def code(options, grad=False):
        torch._dynamo.reset()
        cm = kvfx.compress(torch.compile(copy.deepcopy(m), options=options), proj)
        with torch.set_grad_enabled(grad):
            _, sources = run_and_get_code(lambda: cm(input_ids=ids, use_cache=False))
        return "\n".join(sources)

    assert "assert_size_stride(" not in code({})
    assert "assert_size_stride(" in code({"size_asserts": True})
    assert "assert_size_stride(" in code({}, grad=True)


def test_inference_graphs_drop_the_alignment_asserts_of_kvfx_ops_outputs():
    """The low-bit cache's write (kvfx_lowbit_attention.encode, an int8 output) gets no assert_alignment in the
    generated wrapper (DECODE_PATCHES) unless the user asks for Inductor's."""
    import copy
    from torch._inductor.utils import run_and_get_code
    m = tiny_llama(layers=1)
    proj = random_projections(m, rank=4)
    ids = torch.randint(3, 60, (1, 6))

    def code(options):
        torch._dynamo.reset()
        cm = kvfx.compress(torch.compile(copy.deepcopy(m), options=options), proj, quantize="int4")
        with torch.no_grad():
            _, sources = run_and_get_code(lambda: cm.generate(ids, max_new_tokens=2, do_sample=False,
                                                              pad_token_id=0, eos_token_id=None))
        return "\n".join(sources)

    assert "kvfx_lowbit_attention.encode" in code({}) and "assert_alignment(" not in code({})
    assert "assert_alignment(" in code({"alignment_asserts": True})
