"""Graph constants for kvfx passes: new tensors enter the graph as extra placeholders.

Dynamo's graph cannot take new buffers or get_attr nodes (its and AOTAutograd's checks refuse them),
so kvfx copies the captured graph into a fresh GraphModule, appends one placeholder per new tensor
(projection matrices, folded weights), and the backend calls the compiled graph with those tensors
appended to the runtime arguments. Placeholders that held real tensors in `example_inputs` can be read
back with `value_of`, which is how folds compute W·A from the real weights.

Each constant may carry a `recipe` (a zero-argument function that recomputes it from the projection
tensors). A backend in live mode (`KvfxBackend(live=True)`, used by end-to-end distillation) calls the
recipes at every run instead of passing the frozen tensors, so gradients reach the projections.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copied graph: Dynamo's own graph must stay untouched."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


class GraphConstants:
    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._values = dict(zip(self.placeholders, example_inputs))
        self.tensors: list[torch.Tensor] = []
        self.recipes: list[Callable[[], torch.Tensor] | None] = []

    def value_of(self, node: fx.Node) -> torch.Tensor | None:
        val = self._values.get(node)
        return val if isinstance(val, torch.Tensor) else None

    def add(self, name: str, tensor: torch.Tensor, recipe: Callable[[], torch.Tensor] | None = None) -> fx.Node:
        """Append a placeholder carrying `tensor` (a constant for this compiled graph); `recipe()` recomputes it
        from live (trainable) tensors."""
        last = [n for n in self.gm.graph.nodes if n.op == "placeholder"][-1]
        with self.gm.graph.inserting_after(last):
            node = self.gm.graph.placeholder(f"kvfx_{name}".replace(".", "_"))
        tensor = tensor.detach()
        node.meta["example_value"] = tensor
        self._values[node] = tensor
        self.tensors.append(tensor)
        self.recipes.append(recipe)
        return node

    def live(self) -> list[torch.Tensor]:
        """The constants recomputed from their recipes now (with autograd); frozen ones as they are."""
        return [t if r is None else r() for t, r in zip(self.tensors, self.recipes)]
