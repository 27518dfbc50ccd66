"""Independent float64 NumPy reference for the xlstm-zoo mLSTM models.

Written from the formulas of ``docs/numerics.md`` (sections 1-7), NOT from the
implementation in ``zoo/``.  Everything here runs in float64 so that a comparison against the float32 JAX
implementation exposes formula errors rather than rounding noise.

Conventions
-----------
* Params: a nested dict (or Mapping) of numpy arrays mirroring the Flax params collection (no ``"params"``
  wrapper), e.g. ``params["blocks_0"]["xlstm"]["proj_up_mlstm"]["kernel"]``.
* Config: the same plain JSON-like dict that is handed to ``zoo.load_config``.  Missing fields take the
  documented defaults (see ``_layer_cfg`` / ``_cell_cfg`` / ``_model_cfg``).
* Cell layout: heads first, q, k ``(..., S, DQK)``, v ``(..., S, DV)``, gates ``(..., S)`` pre-activations.
"""

from __future__ import annotations

import math

import numpy as np

F64 = np.float64


# ----------------------------------------------------------------------------------------------------------
# elementwise helpers
# ----------------------------------------------------------------------------------------------------------


def log_sigmoid(x):
    """Stable log(sigmoid(x)) = -log(1 + exp(-x))."""
    x = np.asarray(x, F64)
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    x = np.asarray(x, F64)
    return np.exp(log_sigmoid(x))


def silu(x):
    x = np.asarray(x, F64)
    return x * sigmoid(x)


def gelu_tanh(x):
    x = np.asarray(x, F64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def relu(x):
    return np.maximum(np.asarray(x, F64), 0.0)


def selu(x):
    x = np.asarray(x, F64)
    alpha = 1.6732632423543772848170429916717
    scale = 1.0507009873554804934193349852946
    return scale * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


ACTIVATIONS = {
    "gelu": gelu_tanh,
    "relu": relu,
    "relu^2": lambda x: relu(x) ** 2,
    "sigmoid": sigmoid,
    "swish": silu,
    "selu": selu,
}


def soft_cap(x, cap):
    """c * tanh(x / c), or identity when cap is None."""
    x = np.asarray(x, F64)
    if cap is None:
        return x
    return cap * np.tanh(x / cap)


# ----------------------------------------------------------------------------------------------------------
# cells (docs/numerics.md §4)
# ----------------------------------------------------------------------------------------------------------


def parallel_stabilized_cell(q, k, v, i, f, eps=1e-6, return_aux=False):
    """Parallel stabilized mLSTM (docs/numerics.md §4.3), vectorized over any leading axes.

    q, k: (..., S, DQK); v: (..., S, DV); i, f: (..., S) gate pre-activations.
    Returns h (..., S, DV); with ``return_aux`` also (m, norm), both (..., S).
    """
    q, k, v, i, f = (np.asarray(a, F64) for a in (q, k, v, i, f))
    S, dqk = q.shape[-2], q.shape[-1]
    lf = log_sigmoid(f)  # (..., S)
    cs = np.cumsum(lf, axis=-1)  # cs_t = sum_{r<=t} lf_r
    log_f = cs[..., :, None] - cs[..., None, :]  # [t, s] = cs_t - cs_s
    causal = np.tril(np.ones((S, S), dtype=bool))
    log_f = np.where(causal, log_f, -np.inf)
    log_d = log_f + i[..., None, :]  # + i_s
    m = np.max(log_d, axis=-1)  # row-wise stabilizer, finite (diagonal present)
    scores = np.einsum("...td,...sd->...ts", q, k) / math.sqrt(dqk)
    c_tilde = scores * np.exp(log_d - m[..., None])  # exp(-inf) = 0 above the diagonal
    norm = np.maximum(np.abs(np.sum(c_tilde, axis=-1)), np.exp(-m))
    h = np.einsum("...ts,...sd->...td", c_tilde, v) / (norm[..., None] + eps)
    if return_aux:
        return h, m, norm
    return h


def recurrent_stabilized_cell(q, k, v, i, f, eps=1e-6, return_state=False):
    """Recurrent stabilized mLSTM step form (docs/numerics.md §4.2), looped over time, states start at zero.

    Same shapes as :func:`parallel_stabilized_cell`.  With ``return_state`` also returns the final
    (C (..., DQK, DV), n (..., DQK), m (...)) in the k-unscaled convention.
    """
    q, k, v, i, f = (np.asarray(a, F64) for a in (q, k, v, i, f))
    lead = q.shape[:-2]
    S, dqk = q.shape[-2], q.shape[-1]
    dv = v.shape[-1]
    C = np.zeros(lead + (dqk, dv), F64)
    n = np.zeros(lead + (dqk,), F64)
    m = np.zeros(lead, F64)
    hs = []
    for t in range(S):
        lf_t = log_sigmoid(f[..., t])
        i_t = i[..., t]
        m_new = np.maximum(lf_t + m, i_t)
        f_p = np.exp(lf_t + m - m_new)
        i_p = np.exp(i_t - m_new)
        k_t, v_t = k[..., t, :], v[..., t, :]
        C = f_p[..., None, None] * C + i_p[..., None, None] * (k_t[..., :, None] * v_t[..., None, :])
        n = f_p[..., None] * n + i_p[..., None] * k_t
        m = m_new
        q_hat = q[..., t, :] / math.sqrt(dqk)
        num = np.einsum("...dv,...d->...v", C, q_hat)
        den = np.maximum(np.abs(np.einsum("...d,...d->...", n, q_hat)), np.exp(-m)) + eps
        hs.append(num / den[..., None])
    h = np.stack(hs, axis=-2)
    if return_state:
        return h, (C, n, m)
    return h


# ----------------------------------------------------------------------------------------------------------
# norms (docs/numerics.md §5)
# ----------------------------------------------------------------------------------------------------------


def layernorm(x, scale, eps):
    """LayerNorm over the last axis, fast variance E[x^2]-mu^2 clipped at 0, scale only (no bias)."""
    x = np.asarray(x, F64)
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.maximum(np.mean(x * x, axis=-1, keepdims=True) - mu * mu, 0.0)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(scale, F64)


def rmsnorm(x, scale, eps):
    x = np.asarray(x, F64)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * np.asarray(scale, F64)


NORMS = {"layernorm": layernorm, "rmsnorm": rmsnorm}


def norm(norm_type, x, scale, eps):
    return NORMS[norm_type](x, scale, eps)


def multihead_norm(norm_type, x, scale, eps):
    """x (..., NH, DH), scale (NH, DH): independent norm per head over DH, per-head scale."""
    return NORMS[norm_type](x, scale, eps)


# ----------------------------------------------------------------------------------------------------------
# linear pieces
# ----------------------------------------------------------------------------------------------------------


def dense(x, p, use_bias):
    y = np.asarray(x, F64) @ np.asarray(p["kernel"], F64)
    if use_bias:
        y = y + np.asarray(p["bias"], F64)
    return y


def linear_headwise_expand(x, kernel, bias=None):
    """LHE: y[..., h*out + o] = sum_i W[h, o, i] * x[..., h*b + i] (+ bias). kernel (NPH, out, b)."""
    x = np.asarray(x, F64)
    W = np.asarray(kernel, F64)
    nph, out_ph, b = W.shape
    assert x.shape[-1] == nph * b, (x.shape, W.shape)
    xs = x.reshape(x.shape[:-1] + (nph, b))
    y = np.einsum("...hi,hoi->...ho", xs, W).reshape(x.shape[:-1] + (nph * out_ph,))
    if bias is not None:
        y = y + np.asarray(bias, F64)
    return y


def causal_conv1d(x, kernel, bias):
    """Depthwise causal conv: x_c[t,c] = bias[c] + sum_j W[j,0,c] * x[t-K+1+j, c], zeros for t<0.

    x (B, S, C), kernel (K, 1, C), bias (C,).
    """
    x = np.asarray(x, F64)
    W = np.asarray(kernel, F64)
    K = W.shape[0]
    B, S, C = x.shape
    xp = np.concatenate([np.zeros((B, K - 1, C), F64), x], axis=1)
    y = np.zeros_like(x) + np.asarray(bias, F64)
    for j in range(K):
        y = y + W[j, 0, :] * xp[:, j : j + S, :]
    return y


# ----------------------------------------------------------------------------------------------------------
# config helpers (defaults from docs/numerics.md §2.2)
# ----------------------------------------------------------------------------------------------------------


def proj_up_dim(proj_factor, dim, multiple=64):
    return int(multiple * math.ceil(proj_factor * dim / multiple))


_CELL_DEFAULTS = dict(
    norm_eps=1e-6,
    norm_type_v1="layernorm",
    gate_soft_cap=None,
    gate_linear_headwise=False,
    add_qk_norm=False,
    reset_at_document_boundaries=False,
    reset_fgate_value=-25.0,
)

_LAYER_DEFAULTS = dict(
    layer_type="mlstm",
    num_heads=4,
    proj_factor=2.0,
    conv1d_kernel_size=4,
    qkv_proj_blocksize=4,
    qk_dim_factor=1.0,
    v_dim_factor=1.0,
    gate_input="qkv",
    vmap_qk=False,
)

_MODEL_DEFAULTS = dict(
    norm_type="layernorm",
    norm_eps=1e-6,
    bias=False,
    logits_soft_cap=None,
    tie_weights=False,
    add_post_blocks_norm=True,
)

_FFN_DEFAULTS = dict(proj_factor=1.3, act_fn="gelu", ff_type="ffn_gated", bias=False)


def _model_cfg(cfg):
    out = dict(_MODEL_DEFAULTS)
    out.update({k: v for k, v in cfg.items() if k != "mlstm_block"})
    return out


def _layer_cfg(cfg):
    out = dict(_LAYER_DEFAULTS)
    out.update({k: v for k, v in cfg["mlstm_block"]["mlstm"].items() if k != "mlstm_cell"})
    return out


def _cell_cfg(cfg):
    out = dict(_CELL_DEFAULTS)
    out.update(cfg["mlstm_block"]["mlstm"].get("mlstm_cell", {}) or {})
    return out


def _ffn_cfg(cfg):
    ff = cfg["mlstm_block"].get("feedforward")
    if ff is None:
        return None
    out = dict(_FFN_DEFAULTS)
    out.update(ff)
    return out


def layer_dims(cfg):
    """Derived widths of the configured layer (docs/numerics.md §3.1)."""
    D = cfg["embedding_dim"]
    lc = _layer_cfg(cfg)
    NH = lc["num_heads"]
    qk, vf = lc["qk_dim_factor"], lc["v_dim_factor"]
    if lc["layer_type"] == "mlstm":
        Di = proj_up_dim(lc["proj_factor"], D)
        b = lc["qkv_proj_blocksize"]
        NPH = round(Di // b)
        dqk_tot = NPH * (round(qk * Di) // NPH)
        dv_tot = int(Di * vf)
        gi = lc["gate_input"]
        F = 2 * dqk_tot + dv_tot if gi == "qkv" else Di
        dims = dict(Di=Di, b=b, NPH=NPH, K=lc["conv1d_kernel_size"], F=F)
    else:
        dqk_tot = int(D * qk)
        dv_tot = int(D * vf)
        dims = dict(F=D)
    assert dqk_tot % NH == 0 and dv_tot % NH == 0
    dims.update(D=D, NH=NH, Dqk_tot=dqk_tot, Dv_tot=dv_tot, DQK=dqk_tot // NH, DV=dv_tot // NH)
    return dims


# ----------------------------------------------------------------------------------------------------------
# expected parameter tree (docs/numerics.md §3.4)
# ----------------------------------------------------------------------------------------------------------


def expected_param_shapes(cfg):
    """Flat {"a/b/c": shape} of the Flax params for scan_blocks=False."""
    mc, lc, cc, fc = _model_cfg(cfg), _layer_cfg(cfg), _cell_cfg(cfg), _ffn_cfg(cfg)
    D, V, NB = cfg["embedding_dim"], cfg["vocab_size"], cfg["num_blocks"]
    d = layer_dims(cfg)
    NH = d["NH"]
    bias = mc["bias"]

    def lin(target, prefix, kshape, bshape, with_bias):
        target[prefix + "/kernel"] = tuple(kshape)
        if with_bias:
            target[prefix + "/bias"] = tuple(bshape)

    layer = {}
    if lc["layer_type"] == "mlstm":
        Di, b, NPH, K, F = d["Di"], d["b"], d["NPH"], d["K"], d["F"]
        qk_out, v_out = d["Dqk_tot"] // NPH, d["Dv_tot"] // NPH
        lin(layer, "proj_up_mlstm", (D, Di), (Di,), bias)
        lin(layer, "proj_up_z", (D, d["Dv_tot"]), (d["Dv_tot"],), bias)
        lin(layer, "conv1d", (K, 1, Di), (Di,), True)
        if lc["vmap_qk"]:
            lin(layer, "qk_proj", (2, NPH, qk_out, b), (2, d["Dqk_tot"]), bias)
        else:
            lin(layer, "q_proj", (NPH, qk_out, b), (d["Dqk_tot"],), bias)
            lin(layer, "k_proj", (NPH, qk_out, b), (d["Dqk_tot"],), bias)
        lin(layer, "v_proj", (NPH, v_out, b), (d["Dv_tot"],), bias)
        if d["Dv_tot"] != Di:
            lin(layer, "x_mlstm_conv_scaling", (NPH, v_out, b), (d["Dv_tot"],), bias)
        gk = (NH, 1, F // NH) if cc["gate_linear_headwise"] else (F, NH)
        lin(layer, "mlstm_cell/igate", gk, (NH,), True)
        lin(layer, "mlstm_cell/fgate", gk, (NH,), True)
        layer["mlstm_cell/outnorm/scale"] = (NH, d["DV"])
        layer["learnable_skip"] = (d["Dv_tot"],)
    else:
        lin(layer, "dense_q", (D, d["Dqk_tot"]), (d["Dqk_tot"],), bias)
        lin(layer, "dense_k", (D, d["Dqk_tot"]), (d["Dqk_tot"],), bias)
        lin(layer, "dense_v", (D, d["Dv_tot"]), (d["Dv_tot"],), bias)
        lin(layer, "dense_o", (D, d["Dv_tot"]), (d["Dv_tot"],), bias)
        lin(layer, "igate", (D, NH), (NH,), True)
        lin(layer, "fgate", (D, NH), (NH,), True)
        layer["outnorm/scale"] = (NH, d["DV"])
    if cc["add_qk_norm"]:
        layer["q_norm/scale"] = (d["DQK"],)
        layer["k_norm/scale"] = (d["DQK"],)
    lin(layer, "proj_down", (d["Dv_tot"], D), (D,), bias)

    shapes = {"token_embedding/embedding": (V, D)}
    if mc["add_post_blocks_norm"]:
        shapes["out_norm/scale"] = (D,)
    if not mc["tie_weights"]:
        shapes["lm_head/kernel"] = (D, V)
    post = cfg["mlstm_block"].get("add_post_norm", False)
    for bi in range(NB):
        pre = f"blocks_{bi}/"
        shapes[pre + "xlstm_norm/scale"] = (D,)
        for k, s in layer.items():
            shapes[pre + "xlstm/" + k] = s
        if post:
            shapes[pre + "xlstm_post_norm/scale"] = (D,)
        if fc is not None:
            P = proj_up_dim(fc["proj_factor"], D)
            shapes[pre + "ffn_norm/scale"] = (D,)
            names = ["proj_up", "proj_down"] + (["proj_up_gate"] if fc["ff_type"] == "ffn_gated" else [])
            for nm in names:
                kshape, bshape = ((P, D), (D,)) if nm == "proj_down" else ((D, P), (P,))
                lin(shapes, pre + "ffn/" + nm, kshape, bshape, fc["bias"])
            if post:
                shapes[pre + "ffn_post_norm/scale"] = (D,)
    return shapes


# ----------------------------------------------------------------------------------------------------------
# layers (docs/numerics.md §3)
# ----------------------------------------------------------------------------------------------------------


def _apply_gate_cap_and_reset(i_pre, f_pre, cc, document_borders):
    i_pre = soft_cap(i_pre, cc["gate_soft_cap"])
    f_pre = soft_cap(f_pre, cc["gate_soft_cap"])
    if cc["reset_at_document_boundaries"] and document_borders is not None:
        borders = np.asarray(document_borders, bool)[..., None]  # (B, S, 1) over heads
        f_pre = np.where(borders, F64(cc["reset_fgate_value"]), f_pre)
    return i_pre, f_pre


def _qk_norm(p, q, k, norm_type, eps):
    q = norm(norm_type, q, p["q_norm"]["scale"], eps)
    k = norm(norm_type, k, p["k_norm"]["scale"], eps)
    return q, k


def _run_cell(q, k, v, i_pre, f_pre, cell_fn, eps=1e-6):
    """q, k (B,S,NH,DQK), v (B,S,NH,DV), gates (B,S,NH) -> h (B,S,NH,DV)."""
    h = cell_fn(
        q.transpose(0, 2, 1, 3),
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        i_pre.transpose(0, 2, 1),
        f_pre.transpose(0, 2, 1),
        eps=eps,
    )
    return h.transpose(0, 2, 1, 3)


def _headwise_gate(p, inputs, NH):
    """inputs: list of flat tensors (B,S,W_j). Each split into NH contiguous slices, regrouped per head."""
    W = np.asarray(p["kernel"], F64)  # (NH, 1, F/NH)
    per_head = []
    for h in range(NH):
        parts = []
        for x in inputs:
            w = x.shape[-1] // NH
            parts.append(x[..., h * w : (h + 1) * w])
        per_head.append(np.concatenate(parts, axis=-1))  # (B, S, F/NH)
    g = np.stack([per_head[h] @ W[h, 0] for h in range(NH)], axis=-1)
    return g + np.asarray(p["bias"], F64)


def mlstm_layer(cfg, p, x, document_borders=None, cell_fn=parallel_stabilized_cell):
    """The `mlstm` layer (docs/numerics.md §3.2). x (B,S,D), already normed. Returns (B,S,D)."""
    mc, lc, cc = _model_cfg(cfg), _layer_cfg(cfg), _cell_cfg(cfg)
    d = layer_dims(cfg)
    bias = mc["bias"]
    B, S, _ = x.shape
    NH, DQK, DV = d["NH"], d["DQK"], d["DV"]

    x_m = dense(x, p["proj_up_mlstm"], bias)
    z = dense(x, p["proj_up_z"], bias)
    x_c = causal_conv1d(x_m, p["conv1d"]["kernel"], p["conv1d"]["bias"])
    x_a = silu(x_c)

    def lhe(name, inp, idx=None):
        W = p[name]["kernel"]
        bb = p[name]["bias"] if bias else None
        if idx is not None:
            W = W[idx]
            bb = None if bb is None else bb[idx]
        return linear_headwise_expand(inp, W, bb)

    if lc["vmap_qk"]:
        q = lhe("qk_proj", x_a, 0)
        k = lhe("qk_proj", x_a, 1)
    else:
        q = lhe("q_proj", x_a)
        k = lhe("k_proj", x_a)
    v = lhe("v_proj", x_m)

    gi = lc["gate_input"]
    gate_inputs = {
        "qkv": [q, k, v],
        "x_mlstm": [x_m],
        "x_mlstm_conv": [x_c],
        "x_mlstm_conv_act": [x_a],
    }[gi]
    gates = []
    for name in ("igate", "fgate"):
        gp = p["mlstm_cell"][name]
        if cc["gate_linear_headwise"]:
            gates.append(_headwise_gate(gp, gate_inputs, NH))
        else:
            gates.append(dense(np.concatenate(gate_inputs, axis=-1), gp, True))
    i_pre, f_pre = _apply_gate_cap_and_reset(gates[0], gates[1], cc, document_borders)

    qh = q.reshape(B, S, NH, DQK)
    kh = k.reshape(B, S, NH, DQK)
    vh = v.reshape(B, S, NH, DV)
    if cc["add_qk_norm"]:
        qh, kh = _qk_norm(p, qh, kh, mc["norm_type"], cc["norm_eps"])
    h = _run_cell(qh, kh, vh, i_pre, f_pre, cell_fn)
    h = multihead_norm(mc["norm_type"], h, p["mlstm_cell"]["outnorm"]["scale"], cc["norm_eps"])
    h = h.reshape(B, S, NH * DV)

    skip_in = lhe("x_mlstm_conv_scaling", x_a) if d["Dv_tot"] != d["Di"] else x_a
    y = (h + np.asarray(p["learnable_skip"], F64) * skip_in) * silu(z)
    return dense(y, p["proj_down"], bias)


def mlstm_v1_layer(cfg, p, x, document_borders=None, cell_fn=parallel_stabilized_cell):
    """The `mlstm_v1` layer (docs/numerics.md §3.3). x (B,S,D), already normed. Returns (B,S,D)."""
    mc, cc = _model_cfg(cfg), _cell_cfg(cfg)
    d = layer_dims(cfg)
    bias = mc["bias"]
    B, S, _ = x.shape
    NH, DQK, DV = d["NH"], d["DQK"], d["DV"]

    q = dense(x, p["dense_q"], bias)
    k = dense(x, p["dense_k"], bias)
    v = dense(x, p["dense_v"], bias)
    o = dense(x, p["dense_o"], bias)
    i_pre = dense(x, p["igate"], True)
    f_pre = dense(x, p["fgate"], True)
    i_pre, f_pre = _apply_gate_cap_and_reset(i_pre, f_pre, cc, document_borders)

    qh = q.reshape(B, S, NH, DQK)
    kh = k.reshape(B, S, NH, DQK)
    vh = v.reshape(B, S, NH, DV)
    if cc["add_qk_norm"]:
        qh, kh = _qk_norm(p, qh, kh, mc["norm_type"], cc["norm_eps"])
    h = _run_cell(qh, kh, vh, i_pre, f_pre, cell_fn)
    h = multihead_norm(cc["norm_type_v1"], h, p["outnorm"]["scale"], cc["norm_eps"])
    h = h.reshape(B, S, NH * DV)
    return dense(sigmoid(o) * h, p["proj_down"], bias)


def feedforward(ffn_cfg, p, x):
    """The feed-forward (docs/numerics.md §2.4)."""
    act = ACTIVATIONS[ffn_cfg["act_fn"]]
    use_bias = ffn_cfg["bias"]
    if ffn_cfg["ff_type"] == "ffn_gated":
        hidden = act(dense(x, p["proj_up_gate"], use_bias)) * dense(x, p["proj_up"], use_bias)
    elif ffn_cfg["ff_type"] == "ffn":
        hidden = act(dense(x, p["proj_up"], use_bias))
    else:
        raise ValueError(ffn_cfg["ff_type"])
    return dense(hidden, p["proj_down"], use_bias)


LAYERS = {"mlstm": mlstm_layer, "mlstm_v1": mlstm_v1_layer}


def block(cfg, p, x, document_borders=None, cell_fn=parallel_stabilized_cell):
    mc, lc, cc, fc = _model_cfg(cfg), _layer_cfg(cfg), _cell_cfg(cfg), _ffn_cfg(cfg)
    post = cfg["mlstm_block"].get("add_post_norm", False)
    nt, eps = mc["norm_type"], cc["norm_eps"]
    layer_fn = LAYERS[lc["layer_type"]]

    y = layer_fn(cfg, p["xlstm"], norm(nt, x, p["xlstm_norm"]["scale"], eps), document_borders, cell_fn)
    if post:
        y = norm(nt, y, p["xlstm_post_norm"]["scale"], eps)
    x = x + y
    if fc is not None:
        y = feedforward(fc, p["ffn"], norm(nt, x, p["ffn_norm"]["scale"], eps))
        if post:
            y = norm(nt, y, p["ffn_post_norm"]["scale"], eps)
        x = x + y
    return x


def lm_forward(cfg, params, tokens, document_borders=None, cell_fn=parallel_stabilized_cell):
    """Full LM forward (docs/numerics.md §7.1). tokens (B,S) int. Returns float64 logits (B,S,V)."""
    mc = _model_cfg(cfg)
    emb = np.asarray(params["token_embedding"]["embedding"], F64)
    x = emb[np.asarray(tokens)]
    for bi in range(cfg["num_blocks"]):
        x = block(cfg, params[f"blocks_{bi}"], x, document_borders, cell_fn)
    if mc["add_post_blocks_norm"]:
        x = norm(mc["norm_type"], x, params["out_norm"]["scale"], mc["norm_eps"])
    if mc["tie_weights"]:
        logits = x @ emb.T
    else:
        logits = x @ np.asarray(params["lm_head"]["kernel"], F64)
    return soft_cap(logits, mc["logits_soft_cap"])


# ---------------------------------------------------------------------------------------------------------
# the test inputs of docs/numerics.md §4.5, float64
# ---------------------------------------------------------------------------------------------------------


def golden_inputs():
    """The tiny deterministic case: one head, S=4, DQK=2, DV=3; q, k, v as (S, D), gates as (S,)."""
    t = np.arange(4, dtype=np.float64)[:, None]
    q = np.sin(t + 0.5 * np.arange(2)[None, :])
    k = np.cos(0.7 * t + np.arange(2)[None, :])
    v = 0.1 * t + 0.3 * np.arange(3)[None, :] - 0.2
    i = np.array([0.5, -1.0, 2.0, 0.0])
    f = np.array([3.0, 1.0, -2.0, 4.0])
    return q, k, v, i, f


def doc_random_case():
    """The random case: default_rng(2), B=1, S=128, DH=64, f + 4.5; heads-first with NH=1."""
    rng = np.random.default_rng(2)
    B, S, DH = 1, 128, 64
    q = rng.standard_normal((B, S, DH))
    k = rng.standard_normal((B, S, DH))
    v = rng.standard_normal((B, S, DH))
    i = rng.standard_normal((B, S, 1))
    f = rng.standard_normal((B, S, 1)) + 4.5
    return q[:, None], k[:, None], v[:, None], i[:, None, :, 0], f[:, None, :, 0]
