"""The rewritten graph around attention, as documentation that fails when the rewrite changes.

Each test compresses a tiny model (rank 4 of head_dim 8, inner compiler "eager") and shows the lines of the
rewritten graph from layer 0's first q/k/v projection to its output projection. Names are shortened:
`q_proj.weight` is the model's parameter, `kvfx_*` are constants kvfx added (projections, folded weights).
Regenerate with `EXPECTTEST_ACCEPT=1 python -m pytest tests/passes/test_rewrite_expect.py` and READ the diff.
"""
import expecttest
import torch

import kvfx
from helpers import graph_excerpt, hand_model, model_inputs, random_projections, site_specs, tiny_gpt2, tiny_llama
from kvfx.projections import Projections, SiteProjection


def centred(P: Projections) -> Projections:
    """P with seeded key / value means, as calibrated projections carry (low-bit latents rounded around them)."""
    g = torch.Generator().manual_seed(1)
    return Projections({n: p.centred(torch.randn(*p.key_up.shape[:2], generator=g) / 10,
                                     torch.randn(*p.key_up.shape[:2], generator=g) / 10) for n, p in P.sites.items()},
                       dict(P.shapes), P.method)


def rewritten(model, *args, quantize=None, means=False, **kwargs):
    P = random_projections(model, rank=4)
    cm = kvfx.compress(torch.compile(model, backend="eager"), centred(P) if means else P, quantize=quantize)
    with torch.no_grad():
        cm(*args, **kwargs)
    return cm._kvfx.backend.graphs


def rounded_latents_excerpt(quantize, stop, means=False):
    """A 6-token forward without cache, latents rounded as `quantize` stores them: q·B up to the attention `stop`."""
    m = tiny_llama(1)
    (gm,) = rewritten(m, model_inputs(m), use_cache=False, quantize=quantize, means=means)
    return graph_excerpt(gm, "matmul(q_embed", stop)


def decode_graph(kind, quantize=None, means=False):
    m = tiny_llama(1)
    P = random_projections(m, rank=4)
    cm = kvfx.compress(torch.compile(m, backend="eager"), centred(P) if means else P, cache=kind, quantize=quantize)
    with torch.no_grad():
        cm.generate(model_inputs(m, tokens=5), max_new_tokens=2, do_sample=False)
    return cm._kvfx.backend.graphs[-1]  # prefill, then the first decode step


def shared_prefill_graph():
    """A 14-token prompt prefilling kvfx's dynamic cache with a shared 12-wide latent (4 query, 2 kv heads, d 8)."""
    m = tiny_llama(1)
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(1, 16, 12, generator=g) / 4, torch.randn(2, 8, 12, generator=g) / 3,
            torch.randn(1, 16, 12, generator=g) / 4, torch.randn(2, 8, 12, generator=g) / 3]
    names, shape = site_specs(m)
    proj = Projections({n: SiteProjection(*mats, shared=True) for n in names}, {n: shape for n in names}, method="test")
    cm = kvfx.compress(torch.compile(m, backend="eager"), proj)
    with torch.no_grad():
        cm.generate(model_inputs(m, tokens=14), max_new_tokens=1, do_sample=False)
    return cm._kvfx.backend.graphs[0]


class TestRewriteExpect(expecttest.TestCase):
    def test_llama_rope_gqa(self):
        m = tiny_llama(1)
        (gm,) = rewritten(m, model_inputs(m), use_cache=False)
        # Look for: RoPE blocks folding q/k, so matmul(q_embed, key_up) and matmul(key, key_down) follow it (and
        # matmul(value, value_down), as repeat_kv blocks the v fold); scale stays 1/sqrt(8); output 4 wide, o folded.
        self.assertExpectedInline(graph_excerpt(gm, "linear(", "o_folded_weight"), """\
linear = torch._C._nn.linear(hidden_states_2, q_proj.weight, None)
view = linear.view((1, 6, -1, 8))
query_states = view.transpose(1, 2)
linear_1 = torch._C._nn.linear(hidden_states_2, k_proj.weight, None)
view_1 = linear_1.view((1, 6, -1, 8))
key_states = view_1.transpose(1, 2)
linear_2 = torch._C._nn.linear(hidden_states_2, v_proj.weight, None)
view_2 = linear_2.view((1, 6, -1, 8))
value_states = view_2.transpose(1, 2)
cos_3 = cos_2.unsqueeze(1)
sin_3 = sin_2.unsqueeze(1)
mul_5 = query_states * cos_3
x1 = query_states[(Ellipsis, slice(None, 4, None))]
x2 = query_states[(Ellipsis, slice(4, None, None))]
neg = -x2
cat_1 = torch.cat((neg, x1), dim = -1)
mul_6 = cat_1 * sin_3
q_embed = mul_5 + mul_6
mul_7 = key_states * cos_3
x1_1 = key_states[(Ellipsis, slice(None, 4, None))]
x2_1 = key_states[(Ellipsis, slice(4, None, None))]
neg_1 = -x2_1
cat_2 = torch.cat((neg_1, x1_1), dim = -1)
mul_8 = cat_2 * sin_3
k_embed = mul_7 + mul_8
getitem_14 = k_embed[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
hidden_states_3 = getitem_14.expand(1, 2, 2, 6, 8)
key = hidden_states_3.reshape(1, 4, 6, 8)
getitem_15 = value_states[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
hidden_states_4 = getitem_15.expand(1, 2, 2, 6, 8)
value = hidden_states_4.reshape(1, 4, 6, 8)
matmul = torch.matmul(q_embed, kvfx_key_up)
matmul_1 = torch.matmul(key, kvfx_key_down)
matmul_2 = torch.matmul(value, kvfx_value_down)
attn_output = torch._C._nn.scaled_dot_product_attention(matmul, matmul_1, matmul_2, attn_mask = attention_mask, dropout_p = 0.0, scale = 0.3535533905932738, is_causal = False)
attn_output_1 = attn_output.reshape(1, -1, 6, 4)
transpose_3 = attn_output_1.transpose(1, 2)
attn_output_2 = transpose_3.contiguous()
reshape_3 = attn_output_2.reshape(1, 6, -1)
attn_output_3 = reshape_3.contiguous()
attn_output_4 = torch._C._nn.linear(attn_output_3, kvfx_o_folded_weight, None)""")

    def test_llama_int8_latents(self):
        # Look for: the rank-4 key and value latents each rounded by fake_quant (what the int8 cache would store)
        # before SDPA; everything else as in test_llama_rope_gqa.
        self.assertExpectedInline(rounded_latents_excerpt("int8", "scaled_dot_product_attention"), """\
matmul = torch.matmul(q_embed, kvfx_key_up)
matmul_1 = torch.matmul(key, kvfx_key_down)
matmul_2 = torch.matmul(value, kvfx_value_down)
fake_quant = kvfx_quant_fake_quant(matmul_1, 'int8')
fake_quant_1 = kvfx_quant_fake_quant(matmul_2, 'int8')
attn_output = torch._C._nn.scaled_dot_product_attention(matmul, fake_quant, fake_quant_1, attn_mask = attention_mask, dropout_p = 0.0, scale = 0.3535533905932738, is_causal = False)""")

    def test_llama_exact_window(self):
        # Look for: the latents rounded by fake_quant as in test_llama_int8_latents, and SDPA replaced by the exact
        # window's attention, which also reads the unrounded latents (matmul_1, matmul_2) for the first 2 keys and
        # the 4 nearest each query.
        self.assertExpectedInline(rounded_latents_excerpt("int8|sinks2|recent4", "attention("), """\
matmul = torch.matmul(q_embed, kvfx_key_up)
matmul_1 = torch.matmul(key, kvfx_key_down)
matmul_2 = torch.matmul(value, kvfx_value_down)
fake_quant = kvfx_quant_fake_quant(matmul_1, 'int8|sinks2|recent4')
fake_quant_1 = kvfx_quant_fake_quant(matmul_2, 'int8|sinks2|recent4')
attention = kvfx_passes_exact_window_attention(matmul, matmul_1, matmul_2, fake_quant, fake_quant_1, attn_mask = attention_mask, is_causal = False, scale = 0.3535533905932738, sinks = 2, recent = 4)""")

    def test_llama_decode_exact_rows(self):
        gm = decode_graph("dynamic", quantize="int4|sinks2|recent4")
        # Look for: the cache keeping the step's latent in its exact-rows ring (slot from the position, index_copy_
        # into kvfx_exact_keys / _positions) beside the int4 codes, and the decode kernel reading both: codes,
        # exact rows and their positions (no dequantize node left).
        ring = graph_excerpt(gm, "k = torch.matmul", "exact_values.index_copy_")
        step = graph_excerpt(gm, "reshape = q_embed", "decode_attention")  # between them: the int4 rounding
        self.assertExpectedInline(ring + "\n...\n" + step, """\
k = torch.matmul(k_embed, kvfx_key_down)
arange = torch.arange(1, device = device(type='cpu'))
p = arange + s5
lt = p < 2
getitem_11 = p[-1]
sub = getitem_11 - 4
gt = p > sub
keep = lt | gt
lt_1 = p < 2
sub_1 = p - 2
remainder = torch.remainder(sub_1, 4)
add_5 = 2 + remainder
slot = torch.where(lt_1, p, add_5)
slot_1 = torch.where(keep, slot, 6)
where_2 = torch.where(keep, p, -1)
index_copy_ = l_kwargs_cache_layers_0_kvfx_exact_positions.index_copy_(0, slot_1, where_2)
to_5 = k.to(torch.float16)
index_copy__1 = l_kwargs_cache_layers_0_kvfx_exact_keys.index_copy_(2, slot_1, to_5)
to_6 = value_states.to(torch.float16)
index_copy__2 = l_kwargs_cache_layers_0_kvfx_exact_values.index_copy_(2, slot_1, to_6)
...
reshape = q_embed.reshape(-1, 2, 2, 8)
matmul_2 = torch.matmul(reshape, kvfx_key_up_grouped)
reshape_2 = matmul_2.reshape(-1, 2, 2, 4)
decode_attention_default = torch.ops.kvfx.decode_attention.default(reshape_2, keys, values, 4, 4, 'int4', 0.3535533905932738, None, False, l_kwargs_cache_layers_0_kvfx_exact_keys, l_kwargs_cache_layers_0_kvfx_exact_values, l_kwargs_cache_layers_0_kvfx_exact_positions)""")

    def test_llama_centred_int4_latents(self):
        # Look for: projections with calibration means round each latent around its mean's latent (the graph
        # constants kvfx_key_offset / kvfx_value_offset, [kv heads, 1, R]): fake_quant's third argument.
        self.assertExpectedInline(rounded_latents_excerpt("int4", "scaled_dot_product_attention", means=True), """\
matmul = torch.matmul(q_embed, kvfx_key_up)
matmul_1 = torch.matmul(key, kvfx_key_down)
matmul_2 = torch.matmul(value, kvfx_value_down)
fake_quant = kvfx_quant_fake_quant(matmul_1, 'int4', kvfx_key_offset)
fake_quant_1 = kvfx_quant_fake_quant(matmul_2, 'int4', kvfx_value_offset)
attn_output = torch._C._nn.scaled_dot_product_attention(matmul, fake_quant, fake_quant_1, attn_mask = attention_mask, dropout_p = 0.0, scale = 0.3535533905932738, is_causal = False)""")

    def test_llama_decode_centred(self):
        gm = decode_graph("dynamic", quantize="int4", means=True)
        # Look for: the cache writing latent - offset as int4 codes, and the decode kernel's output getting the
        # value offset back once (the key offset shifts every score of a query alike: softmax drops it).
        # v·C folded into v_proj: value_states is v·C; kvfx::quantize encodes a step's row too (the C++ op `encode`
        # in the graph handed to Inductor, passes/decode_kernel.py)
        write = graph_excerpt(gm, "k = torch.matmul", "v_2 = ")
        step = graph_excerpt(gm, "decode_attention_default =", "reshape_3 =")
        self.assertExpectedInline(write + "\n...\n" + step, """\
k = torch.matmul(k_embed, kvfx_key_down)
k_1 = k - l_kwargs_cache_layers_0_kvfx_key_offset
v_1 = value_states - l_kwargs_cache_layers_0_kvfx_value_offset
k_2 = torch.ops.kvfx.quantize(k_1, 'int4')
v_2 = torch.ops.kvfx.quantize(v_1, 'int4')
...
decode_attention_default = torch.ops.kvfx.decode_attention.default(reshape_2, keys, values, 4, 4, 'int4', 0.3535533905932738, None, False)
add_16 = torch.add(decode_attention_default, l_kwargs_cache_layers_0_kvfx_value_offset)
reshape_3 = add_16.reshape(-1, 4, 1, 4)""")

    def test_gpt2_fused_qkv(self):
        m = tiny_gpt2(1)
        (gm,) = rewritten(m, model_inputs(m), use_cache=False)
        # Look for: all folded, no matmul left; c_attn's fused weight/bias replaced (48 = q, k, v × 4 heads × rank 4),
        # split [16, 16, 16], heads viewed 4 wide, c_proj reads a folded weight.
        self.assertExpectedInline(graph_excerpt(gm, "addmm(", "o_folded_weight"), """\
x = torch.addmm(kvfx_c_attn_folded_bias, view_1, kvfx_c_attn_folded_weight)
x_1 = x.view((1, 6, 48))
split = x_1.split([16, 16, 16], dim = 2)
query_states = split[0]
key_states = split[1]
value_states = split[2]
view_3 = key_states.view((1, 6, -1, 4))
key_states_1 = view_3.transpose(1, 2)
view_4 = value_states.view((1, 6, -1, 4))
value_states_1 = view_4.transpose(1, 2)
view_5 = query_states.view((1, 6, -1, 4))
query_states_1 = view_5.transpose(1, 2)
attn_output = torch._C._nn.scaled_dot_product_attention(query_states_1, key_states_1, value_states_1, attn_mask = attention_mask, dropout_p = 0.0, scale = 0.3535533905932738, is_causal = False)
attn_output_1 = attn_output.reshape(1, -1, 6, 4)
transpose_3 = attn_output_1.transpose(1, 2)
attn_output_2 = transpose_3.contiguous()
reshape_1 = attn_output_2.reshape(1, 6, -1)
attn_output_3 = reshape_1.contiguous()
view_6 = attn_output_3.view(-1, 16)
x_2 = torch.addmm(c_proj.bias, view_6, kvfx_o_folded_weight)""")

    def test_hand_written_sdpa(self):
        m = hand_model(1)
        (gm,) = rewritten(m, model_inputs(m))
        # Look for: q/k/v weights and biases folded, views 4 wide, scale set to the ORIGINAL 1/sqrt(8), o folded.
        self.assertExpectedInline(graph_excerpt(gm, "linear(", "o_folded_weight"), """\
linear = torch._C._nn.linear(l_x_, kvfx_q_proj_folded_weight, kvfx_q_proj_folded_bias)
view = linear.view(1, 6, 4, 4)
q = view.transpose(1, 2)
linear_1 = torch._C._nn.linear(l_x_, kvfx_k_proj_folded_weight, kvfx_k_proj_folded_bias)
view_1 = linear_1.view(1, 6, 4, 4)
k = view_1.transpose(1, 2)
linear_2 = torch._C._nn.linear(l_x_, kvfx_v_proj_folded_weight, kvfx_v_proj_folded_bias)
view_2 = linear_2.view(1, 6, 4, 4)
v = view_2.transpose(1, 2)
o = torch._C._nn.scaled_dot_product_attention(q, k, v, is_causal = True, scale = 0.35355339059327373)
transpose_3 = o.transpose(1, 2)
reshape = transpose_3.reshape(1, 6, 16)
linear_3 = torch._C._nn.linear(reshape, kvfx_o_folded_weight, None)""")

    def test_llama_decode_dynamic_cache(self):
        gm = decode_graph("dynamic")
        # Look for: cache write matmul(k_embed, key_down), v_proj folded (values 4 wide), SDPA reading the rank-4
        # `keys`/`values` cats directly (no reconstruction matmul); the query heads of each kv head side by side
        # ([b, 2, 2, 8]) times key_up once per kv head (`key_up_grouped`, not repeated per query head); o folded.
        self.assertExpectedInline(graph_excerpt(gm, "linear(", "o_folded_weight"), """\
linear = torch._C._nn.linear(hidden_states_2, q_proj.weight, None)
view = linear.view((1, 1, -1, 8))
query_states = view.transpose(1, 2)
linear_1 = torch._C._nn.linear(hidden_states_2, k_proj.weight, None)
view_1 = linear_1.view((1, 1, -1, 8))
key_states = view_1.transpose(1, 2)
linear_2 = torch._C._nn.linear(hidden_states_2, kvfx_v_proj_folded_weight, None)
view_2 = linear_2.view((1, 1, -1, 4))
value_states = view_2.transpose(1, 2)
cos_3 = cos_2.unsqueeze(1)
sin_3 = sin_2.unsqueeze(1)
mul_5 = query_states * cos_3
x1 = query_states[(Ellipsis, slice(None, 4, None))]
x2 = query_states[(Ellipsis, slice(4, None, None))]
neg = -x2
cat_1 = torch.cat((neg, x1), dim = -1)
mul_6 = cat_1 * sin_3
q_embed = mul_5 + mul_6
mul_7 = key_states * cos_3
x1_1 = key_states[(Ellipsis, slice(None, 4, None))]
x2_1 = key_states[(Ellipsis, slice(4, None, None))]
neg_1 = -x2_1
cat_2 = torch.cat((neg_1, x1_1), dim = -1)
mul_8 = cat_2 * sin_3
k_embed = mul_7 + mul_8
k = torch.matmul(k_embed, kvfx_key_down)
arange = torch.arange(1, device = device(type='cpu'))
add_5 = arange + s5
index_copy_ = l_kwargs_cache_layers_0_slots_keys_storage.index_copy_(2, add_5, k)
new_empty = l_kwargs_cache_layers_0_slots_keys_filled.new_empty(0, add)
keys = l_kwargs_cache_layers_0_slots_keys_storage[(slice(None, None, None), slice(None, None, None), slice(None, add, None))]
add_8 = s25 + 1
arange_1 = torch.arange(1, device = device(type='cpu'))
add_9 = arange_1 + s25
index_copy__1 = l_kwargs_cache_layers_0_slots_values_storage.index_copy_(2, add_9, value_states)
new_empty_1 = l_kwargs_cache_layers_0_slots_values_filled.new_empty(0, add_8)
values = l_kwargs_cache_layers_0_slots_values_storage[(slice(None, None, None), slice(None, None, None), slice(None, add_8, None))]
reshape = q_embed.reshape(-1, 2, 2, 8)
matmul_2 = torch.matmul(reshape, kvfx_key_up_grouped)
reshape_2 = matmul_2.reshape(-1, 2, 2, 4)
attn_output = torch._C._nn.scaled_dot_product_attention(reshape_2, keys, values, attn_mask = None, dropout_p = 0.0, scale = 0.3535533905932738, is_causal = False, enable_gqa = False)
reshape_3 = attn_output.reshape(-1, 4, 1, 4)
attn_output_1 = reshape_3.reshape(1, -1, 1, 4)
transpose_3 = attn_output_1.transpose(1, 2)
attn_output_2 = transpose_3.contiguous()
reshape_1 = attn_output_2.reshape(1, 1, -1)
attn_output_3 = reshape_1.contiguous()
attn_output_4 = torch._C._nn.linear(attn_output_3, kvfx_o_folded_weight, None)""")

    def test_llama_decode_static_cache(self):
        gm = decode_graph("static")
        # Look for: index_copy_ of rank-4 k / value_states into the cache, repeat_kv's expand/reshape retargeted
        # to width 4 on the cache tensors, SDPA reading them with the grouped q·key_up; o folded.
        self.assertExpectedInline(graph_excerpt(gm, "linear(", "o_folded_weight"), """\
linear = torch._C._nn.linear(hidden_states_2, q_proj.weight, None)
view = linear.view((1, 1, -1, 8))
query_states = view.transpose(1, 2)
linear_1 = torch._C._nn.linear(hidden_states_2, k_proj.weight, None)
view_1 = linear_1.view((1, 1, -1, 8))
key_states = view_1.transpose(1, 2)
linear_2 = torch._C._nn.linear(hidden_states_2, kvfx_v_proj_folded_weight, None)
view_2 = linear_2.view((1, 1, -1, 4))
value_states = view_2.transpose(1, 2)
cos_3 = cos_2.unsqueeze(1)
sin_3 = sin_2.unsqueeze(1)
mul_5 = query_states * cos_3
x1 = query_states[(Ellipsis, slice(None, 4, None))]
x2 = query_states[(Ellipsis, slice(4, None, None))]
neg = -x2
cat_1 = torch.cat((neg, x1), dim = -1)
mul_6 = cat_1 * sin_3
q_embed = mul_5 + mul_6
mul_7 = key_states * cos_3
x1_1 = key_states[(Ellipsis, slice(None, 4, None))]
x2_1 = key_states[(Ellipsis, slice(4, None, None))]
neg_1 = -x2_1
cat_2 = torch.cat((neg_1, x1_1), dim = -1)
mul_8 = cat_2 * sin_3
k_embed = mul_7 + mul_8
k = torch.matmul(k_embed, kvfx_key_down)
arange = torch.arange(1, device = device(type='cpu'))
cache_position = arange + l_kwargs_cache_layers_0_cumulative_length
add_ = l_kwargs_cache_layers_0_cumulative_length.add_(1)
index_copy_ = l_kwargs_cache_layers_0_keys.index_copy_(2, cache_position, k)
index_copy__1 = l_kwargs_cache_layers_0_values.index_copy_(2, cache_position, value_states)
reshape = q_embed.reshape(-1, 2, 2, 8)
matmul_2 = torch.matmul(reshape, kvfx_key_up_grouped)
reshape_4 = matmul_2.reshape(-1, 2, 2, 4)
attn_output = torch._C._nn.scaled_dot_product_attention(reshape_4, l_kwargs_cache_layers_0_keys, l_kwargs_cache_layers_0_values, attn_mask = l_kwargs_attention_mask_, dropout_p = 0.0, scale = 0.3535533905932738, is_causal = False, enable_gqa = False)
reshape_5 = attn_output.reshape(-1, 4, 1, 4)
attn_output_1 = reshape_5.reshape(1, -1, 1, 4)
transpose_3 = attn_output_1.transpose(1, 2)
attn_output_2 = transpose_3.contiguous()
reshape_3 = attn_output_2.reshape(1, 1, -1)
attn_output_3 = reshape_3.contiguous()
attn_output_4 = torch._C._nn.linear(attn_output_3, kvfx_o_folded_weight, None)""")

    def test_llama_shared_prefill_expanded(self):
        gm = shared_prefill_graph()
        # Look for: the cache write of ONE latent c = k·A + v·C (12 wide, one "head"), then, 14 query rows being
        # above the threshold (12 here), c expanded back to the 2 kv heads (c·Bᵀ, c·Dᵀ: 8 wide; keys and values of
        # both heads in one product by [12, 2·2·8], split and viewed as heads) and SDPA run as the original's
        # (query q_embed, enable_gqa) — no q·B, no ·Dᵀ after, W_O unfolded.
        self.assertExpectedInline(graph_excerpt(gm, "k_embed = ", "o_proj.weight"), """\
k_embed = mul_7 + mul_8
transpose_3 = k_embed.transpose(1, 2)
flatten = transpose_3.flatten(2)
matmul = torch.matmul(flatten, kvfx_key_down)
k = matmul.unsqueeze(1)
transpose_4 = value_states.transpose(1, 2)
flatten_1 = transpose_4.flatten(2)
matmul_1 = torch.matmul(flatten_1, kvfx_value_down)
v = matmul_1.unsqueeze(1)
k_1 = k + v
v_1 = v[(Ellipsis, slice(None, 0, None))]
add_4 = s84 + 1
grown = k_1.new_empty(1, 1, add_4, 12)
arange = torch.arange(14, device = device(type='cpu'))
add_5 = arange + 0
index_copy_ = grown.index_copy_(2, add_5, k_1)
new_empty_1 = l_kwargs_cache_layers_0_slots_keys_filled.new_empty(0, 14)
keys = grown[(slice(None, None, None), slice(None, None, None), slice(None, 14, None))]
grown_1 = v_1.new_empty(1, 1, add_4, 0)
arange_1 = torch.arange(14, device = device(type='cpu'))
add_7 = arange_1 + 0
index_copy__1 = grown_1.index_copy_(2, add_7, v_1)
new_empty_3 = l_kwargs_cache_layers_0_slots_values_filled.new_empty(0, 14)
matmul_2 = torch.matmul(keys, kvfx_kv_heads)
split = matmul_2.split(16, -1)
getitem_1 = split[0]
getitem_2 = split[1]
squeeze = getitem_1.squeeze(1)
unflatten = squeeze.unflatten(-1, (2, 8))
transpose = unflatten.transpose(1, 2)
squeeze_1 = getitem_2.squeeze(1)
unflatten_1 = squeeze_1.unflatten(-1, (2, 8))
transpose_6 = unflatten_1.transpose(1, 2)
attn_output = torch._C._nn.scaled_dot_product_attention(q_embed, transpose, transpose_6, attn_mask = None, dropout_p = 0.0, scale = 0.3535533905932738, is_causal = True, enable_gqa = True)
attn_output_1 = attn_output.reshape(1, -1, 14, 8)
transpose_5 = attn_output_1.transpose(1, 2)
attn_output_2 = transpose_5.contiguous()
reshape_1 = attn_output_2.reshape(1, 14, -1)
attn_output_3 = reshape_1.contiguous()
attn_output_4 = torch._C._nn.linear(attn_output_3, o_proj.weight, None)""")
