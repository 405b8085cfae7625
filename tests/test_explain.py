"""kvfx.explain traces with its own backend on a copy of the forward's code: the user's other compiled functions and
a compressed model's compiled graphs survive it (torch._dynamo.explain / reset would discard them all)."""
import torch

import kvfx
from helpers import hand_model, model_inputs, random_projections


def test_explain_leaves_other_compiled_code_alone():
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    @torch.compile(backend=counting)
    def f(x):
        return x.sin() + 1

    x = torch.randn(3)
    f(x)
    m = hand_model(1)
    ids = model_inputs(m)
    cm = kvfx.compress(torch.compile(m, backend="eager"), random_projections(m, rank=4))
    with torch.no_grad():
        expected = cm(ids)
    graphs = kvfx.counters["kvfx"]["graphs"]
    for model in (m, cm):
        e = kvfx.explain(model, ids, print_table=False)
        assert [r.status for r in e.rows] and e.graphs == 1 and e.graph_breaks == 0
    f(x)
    with torch.no_grad():
        out = cm(ids)
    assert len(calls) == 1  # f was not recompiled
    assert kvfx.counters["kvfx"]["graphs"] == graphs  # nor was the compressed model
    torch.testing.assert_close(out, expected)
